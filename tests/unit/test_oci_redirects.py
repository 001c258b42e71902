"""The redirect policy (oci.redirects) and the error text kept from registry answers (#16 items 7, 8)."""

from __future__ import annotations

import pytest

from cluster_registry.oci import redirects
from cluster_registry.oci.errors import RegistryProtocolError, error_detail

REG = "https://registry.example.com/v2/app/blobs/sha256:ab"

# (from, to, addresses the target resolves to, operator-listed hosts, refused?)
CASES = [
    (REG, "https://cdn.example.net/blob?sig=x", ["203.0.113.7"], (), None),
    (REG, "/v2/app/blobs/uploads/x", [], (), None),  # (joined by the caller: same host)
    (REG, "http://cdn.example.net/blob", ["203.0.113.7"], (), "from https to plain http"),
    (REG, "ftp://cdn.example.net/blob", ["203.0.113.7"], (), "to a ftp: URL"),
    (REG, "file:///etc/passwd", [], (), "to a file: URL"),
    (REG, "https://127.0.0.1:8080/admin", ["127.0.0.1"], (), "to an internal address (127.0.0.1)"),
    (REG, "https://[::1]/admin", ["::1"], (), "to an internal address (::1)"),
    (REG, "https://localhost/admin", ["127.0.0.1"], (), "to localhost"),
    (REG, "https://evil.localhost/", [], (), "to evil.localhost"),
    (REG, "https://169.254.169.254/latest/meta-data/", ["169.254.169.254"], (), "to a metadata service address (169.254.169.254)"),
    (REG, "https://metadata.google.internal/computeMetadata/v1/", ["169.254.169.254"], (), "to metadata.google.internal"),
    (REG, "https://[fd00:ec2::254]/", ["fd00:ec2::254"], (), "to a metadata service address (fd00:ec2::254)"),
    (REG, "https://100.100.100.200/", ["100.100.100.200"], (), "to a metadata service address (100.100.100.200)"),
    (REG, "https://link.example/", ["169.254.10.1"], (), "to an internal address (169.254.10.1)"),
    (REG, "https://v6link.example/", ["fe80::1%eth0"], (), "to an internal address (fe80::1)"),
    (REG, "https://mapped.example/", ["::ffff:127.0.0.1"], (), "to an internal address (127.0.0.1)"),
    (REG, "https://rebind.example/", ["203.0.113.7", "127.0.0.1"], (), "to an internal address (127.0.0.1)"),
    (REG, "https://0.0.0.0/", ["0.0.0.0"], (), "to an internal address (0.0.0.0)"),
    # a registry on loopback redirecting to itself (another port), and hosts the operator listed
    ("http://127.0.0.1:5000/v2/x", "http://127.0.0.1:5001/blob", ["127.0.0.1"], (), None),
    (REG, "https://10.0.0.5/blob", ["10.0.0.5"], (), None),  # cluster-internal: not loopback/link-local
    (REG, "https://127.0.0.1:9000/blob", ["127.0.0.1"], ("127.0.0.1:9000",), None),
    (REG, "https://minio.local/blob", ["127.0.0.1"], ("minio.local",), None),
    ("http://r.example/v2/x", "http://cdn.example/blob", ["203.0.113.7"], (), None),  # http -> http: no downgrade
]


@pytest.mark.parametrize(("current", "target", "addresses", "allowed", "why"), CASES)
def test_redirect_policy(current: str, target: str, addresses: list[str], allowed: tuple[str, ...], why: str | None) -> None:
    from urllib.parse import urljoin

    assert redirects.refusal(current, urljoin(current, target), addresses, frozenset(allowed)) == why


def test_check_resolves_the_target_and_raises_a_permanent_error() -> None:
    seen: list[str] = []

    def resolver(host: str) -> list[str]:
        seen.append(host)
        return ["169.254.169.254"]

    with pytest.raises(RegistryProtocolError, match=r"registry.example.com redirected to a metadata service"):
        redirects.check(REG, "https://innocent.example/x", resolver=resolver)
    assert seen == ["innocent.example"]
    redirects.check(REG, "https://registry.example.com/other", resolver=resolver)  # same host: not resolved
    assert seen == ["innocent.example"]


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}',
         "MANIFEST_UNKNOWN manifest unknown"),  # fmt: skip
        ('{"errors":[{"code":"DENIED","message":"a\\nb"},{"code":"UNAUTHORIZED"}]}', "DENIED a b; UNAUTHORIZED"),
        ("<html><body><h1>Internal admin</h1><p>secret=hunter2</p></body></html>", ""),  # never copied
        ('{"secret": "hunter2"}', ""),
        ('{"errors":[{"code":"<script>","message":"x"}]}', ""),
        ('{"errors":[' + ",".join(['{"code":"E","message":"' + "m" * 500 + '"}'] * 9) + "]}", "; ".join(["E " + "m" * 200] * 3)),
    ],
)
def test_error_text_keeps_only_distribution_codes_and_messages(body: str, want: str) -> None:
    """A PoC put an internal admin page's contents into an Artifact's status through a redirect."""
    assert error_detail(body) == want
