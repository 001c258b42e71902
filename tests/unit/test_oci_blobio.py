"""The blob threads' message for a failed connection (their HTTP answers: tests/unit/test_oci_errors.py)."""

from __future__ import annotations

from cluster_registry.oci import blobio
from cluster_registry.oci.errors import RegistryUnavailableError


def test_transport_errors_name_no_url() -> None:
    err = blobio._transport_error(ConnectionResetError(104, "Connection reset by peer"), "get blob h/r@d", "download")
    assert isinstance(err, RegistryUnavailableError) and err.temporary
    assert "Connection reset by peer" in str(err)
