"""The webhook command's option handling (no server is started)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cluster_registry.cli import cli
from cluster_registry.errors import ConfigError
from cluster_registry.webhook.cli import split_host_port


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0.0.0.0:8443", ("0.0.0.0", 8443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9443", ("::1", 9443)),
        ("[::]", ("::", 8443)),
        ("localhost", ("localhost", 8443)),
        (":8443", ("0.0.0.0", 8443)),
    ],
)
def test_split_host_port(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text) == want


def test_bad_port() -> None:
    with pytest.raises(ConfigError):
        split_host_port("host:https")


def test_tls_files_are_required() -> None:
    result = CliRunner().invoke(cli, ["webhook", "--registry-host", "cr.local:5000", "--offline"])
    assert result.exit_code == 2 and "--tls-cert and --tls-key are required" in result.output


def test_registry_host_from_the_environment_and_policy_checked() -> None:
    env = {"CLUSTER_REGISTRY_WEBHOOK_REGISTRY_HOST": "cr.local:5000", "CLUSTER_REGISTRY_WEBHOOK_REWRITE_POLICY": "Sometimes"}
    result = CliRunner().invoke(cli, ["webhook", "--offline"], env=env)
    assert result.exit_code == 2 and "Sometimes" in result.output
