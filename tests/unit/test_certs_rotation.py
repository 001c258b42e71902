"""A CA rotation without a failed admission call (#16 item 12): `certs` run against an in-memory API
server. After every write it makes, every certificate a webhook replica may be serving (the one it
loaded before, or the Secret's current one, once the kubelet has synced it) must verify against the
caBundle the API server holds at that moment."""

from __future__ import annotations

import base64
import copy
import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from cluster_registry.certs import pki
from cluster_registry.certs.cli import run
from tests.support import jsonpatch

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
NS, SECRET, SERVICE, MWC = "cluster-registry", "cr-webhook-tls", "cr-webhook", "cr-webhook"


class Obj:
    def __init__(self, data: dict[str, Any], rv: int) -> None:
        self.data = data
        self.metadata = type("Meta", (), {"resource_version": str(rv), "labels": {}, "annotations": None})()


class Cluster:
    """The Secret and the webhook configuration; ``check`` runs after every write."""

    def __init__(self) -> None:
        self.secret: dict[str, str] | None = None
        self.mwc: dict[str, Any] = {"webhooks": [{"name": "pods.clusterregistry.io",
                                                  "clientConfig": {"service": {"name": SERVICE, "namespace": NS}}}]}  # fmt: skip
        self.rv = 1
        self.served: set[bytes] = set()  # serving certificates some replica may present
        self.writes: list[str] = []
        self.api_client = self

    # -- CoreV1Api
    def read_namespaced_secret(self, name: str, namespace: str) -> Obj:
        from kubernetes.client.exceptions import ApiException

        if self.secret is None:
            raise ApiException(status=404)
        return Obj(dict(self.secret), self.rv)

    def create_namespaced_secret(self, namespace: str, body: Any) -> None:
        self._write_secret(body)

    def replace_namespaced_secret(self, name: str, namespace: str, body: Any) -> None:
        self._write_secret(body)

    def _write_secret(self, body: Any) -> None:
        self.secret = dict(body.data)
        self.rv += 1
        self.writes.append("secret")
        self.served.add(base64.b64decode(self.secret[pki.TLS_CERT]))  # a replica that synced already
        self.check()

    # -- AdmissionregistrationV1Api
    def read_mutating_webhook_configuration(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.mwc)

    def sanitize_for_serialization(self, obj: Any) -> Any:
        return obj

    def patch_mutating_webhook_configuration(self, name: str, ops: list[dict[str, Any]], **kw: Any) -> None:
        self.mwc = jsonpatch.apply(self.mwc, ops)
        self.writes.append("caBundle")
        self.check()

    def check(self) -> None:
        bundle = self.mwc["webhooks"][0]["clientConfig"].get("caBundle")
        if bundle is None:
            return  # not installed yet: the API server does not call the webhook without a bundle
        cas = x509.load_pem_x509_certificates(base64.b64decode(bundle))
        for pem in self.served:
            assert any(_signed_by(x509.load_pem_x509_certificate(pem), ca) for ca in cas), (
                f"a replica serving a certificate would fail admission after {self.writes}"
            )

    def step(self, now: dt.datetime) -> str:
        report = run(self, self, NS, SECRET, SERVICE, MWC, dt.timedelta(hours=720), False, now)
        return str(report["action"])

    def reloaded(self) -> None:
        """Every replica has reloaded the Secret's files: only its certificate is served."""
        assert self.secret is not None
        self.served = {base64.b64decode(self.secret[pki.TLS_CERT])}


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def test_no_admission_call_fails_across_a_ca_rotation() -> None:
    c = Cluster()
    assert c.step(NOW) == "created"
    c.reloaded()
    c.check()
    # ten years on, the CA is about to expire: a new one
    later = NOW + pki.CA_VALIDITY - dt.timedelta(days=10)
    assert c.step(later) == "regenerated"
    assert c.writes[-2:] == ["caBundle", "secret"], "both CAs are trusted before the Secret changes"
    assert len(x509.load_pem_x509_certificates(base64.b64decode(c.mwc["webhooks"][0]["clientConfig"]["caBundle"]))) == 2
    assert c.step(later + dt.timedelta(minutes=10)) == "unchanged"  # within the overlap: both stay
    c.reloaded()
    # after the overlap, the old CA leaves the bundle
    assert c.step(later + pki.OVERLAP) == "trimmed"
    cas = x509.load_pem_x509_certificates(base64.b64decode(c.mwc["webhooks"][0]["clientConfig"]["caBundle"]))
    assert len(cas) == 1 and c.secret is not None and pki.CA_PREVIOUS not in c.secret
    c.check()
    assert c.step(later + 2 * pki.OVERLAP) == "unchanged"


def test_without_the_overlap_a_rotation_would_fail_calls() -> None:
    """The check above can fail: publishing the new CA alone while a replica still serves the old
    certificate is caught."""
    c = Cluster()
    c.step(NOW)
    c.reloaded()
    old_bundle = c.mwc["webhooks"][0]["clientConfig"]["caBundle"]
    new_ca, _ = pki.new_ca(NOW)
    try:
        c.patch_mutating_webhook_configuration(MWC, [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
                                                      "value": base64.b64encode(new_ca).decode()}])  # fmt: skip
    except AssertionError as err:
        assert "would fail admission" in str(err)
    else:
        raise AssertionError(f"a bundle without the served certificate's CA passed the check ({old_bundle[:8]})")
