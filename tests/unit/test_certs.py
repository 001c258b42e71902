"""The webhook certificate logic (pure): create, keep, renew with the same CA, regenerate."""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509

from cluster_registry.certs import pki
from cluster_registry.certs.cli import ca_bundle_patch
from cluster_registry.errors import ConfigError

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
NAMES = pki.service_names("cr-webhook", "cluster-registry")
MONTH = dt.timedelta(hours=720)


def cert(data: dict[str, bytes], key: str = pki.TLS_CERT) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data[key])


def test_create_from_nothing() -> None:
    d = pki.plan(None, NAMES, NOW, MONTH)
    assert d.action is pki.Action.CREATE
    assert set(d.data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    serving, ca = cert(d.data), cert(d.data, pki.CA_CERT)
    serving.verify_directly_issued_by(ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "cr-webhook.cluster-registry.svc",
        "cr-webhook.cluster-registry.svc.cluster.local",
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert serving.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.not_valid_after_utc - NOW > dt.timedelta(days=3000)
    assert serving.not_valid_after_utc - NOW == pki.SERVING_VALIDITY
    assert serving.not_valid_before_utc < NOW  # back-dated for clock skew


def test_valid_secret_is_kept_byte_for_byte() -> None:
    first = pki.plan(None, NAMES, NOW, MONTH)
    again = pki.plan(first.data, NAMES, NOW + dt.timedelta(days=100), MONTH)
    assert again.action is pki.Action.KEEP and again.data == first.data


def test_renewal_near_expiry_keeps_the_ca() -> None:
    first = pki.plan(None, NAMES, NOW, MONTH)
    later = NOW + pki.SERVING_VALIDITY - dt.timedelta(days=10)  # within 720h of expiry
    d = pki.plan(first.data, NAMES, later, MONTH)
    assert d.action is pki.Action.RENEW and "expires" in d.reason
    assert d.data[pki.CA_CERT] == first.data[pki.CA_CERT] and d.data[pki.CA_KEY] == first.data[pki.CA_KEY]
    assert d.data[pki.TLS_CERT] != first.data[pki.TLS_CERT]
    cert(d.data).verify_directly_issued_by(cert(first.data, pki.CA_CERT))  # old caBundle still trusts it
    assert cert(d.data).not_valid_after_utc > later + dt.timedelta(days=300)
    # and the TLS stack accepts the renewed pair under the old bundle
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in d.data.items():
            Path(tmp, k).write_bytes(v)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(Path(tmp, "tls.crt"), Path(tmp, "tls.key"))
        client = ssl.create_default_context(cafile=str(Path(tmp, "ca.crt")))
        assert client.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("damage", "action", "reason"),
    [
        (lambda d: d.pop("tls.key"), pki.Action.RENEW, "no serving certificate"),
        (lambda d: d.__setitem__("tls.key", pki.plan(None, NAMES, NOW, MONTH).data["tls.key"]), pki.Action.RENEW, "does not match"),
        (lambda d: d.__setitem__("tls.crt", b"garbage"), pki.Action.RENEW, "unreadable"),
        (lambda d: d.pop("ca.key"), pki.Action.REGENERATE, "no CA"),
        (lambda d: d.__setitem__("ca.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), pki.Action.REGENERATE, "unreadable CA"),
    ],
)
def test_damaged_secrets(damage: object, action: pki.Action, reason: str) -> None:
    data = dict(pki.plan(None, NAMES, NOW, MONTH).data)
    damage(data)  # type: ignore[operator]
    d = pki.plan(data, NAMES, NOW, MONTH)
    assert d.action is action and reason in d.reason
    assert pki.plan(d.data, NAMES, NOW, MONTH).action is pki.Action.KEEP


def test_serving_cert_from_another_ca_or_for_another_service_is_renewed() -> None:
    a, b = pki.plan(None, NAMES, NOW, MONTH).data, pki.plan(None, NAMES, NOW, MONTH).data
    mixed = {**a, "tls.crt": b["tls.crt"], "tls.key": b["tls.key"]}
    assert "not signed by the CA" in pki.plan(mixed, NAMES, NOW, MONTH).reason
    other = pki.plan(a, pki.service_names("renamed", "cluster-registry"), NOW, MONTH)
    assert other.action is pki.Action.RENEW and "does not cover" in other.reason
    assert other.data["ca.crt"] == a["ca.crt"]


def test_expiring_ca_regenerates_everything() -> None:
    first = pki.plan(None, NAMES, NOW, MONTH)
    d = pki.plan(first.data, NAMES, NOW + pki.CA_VALIDITY - dt.timedelta(days=1), MONTH)
    assert d.action is pki.Action.REGENERATE and d.data["ca.crt"] != first.data["ca.crt"]


def test_serving_cert_never_outlives_its_ca() -> None:
    ca_cert, ca_key = pki.new_ca(NOW, validity=dt.timedelta(days=30))
    crt, _ = pki.new_serving(ca_cert, ca_key, NAMES, NOW)
    assert x509.load_pem_x509_certificate(crt).not_valid_after_utc <= NOW + dt.timedelta(days=30)


def test_ip_sans() -> None:
    ca_cert, ca_key = pki.new_ca(NOW)
    crt, _ = pki.new_serving(ca_cert, ca_key, ["localhost"], NOW, ip_addresses=["127.0.0.1", "::1"])
    sans = x509.load_pem_x509_certificate(crt).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize(("text", "want"), [("720h", dt.timedelta(hours=720)), ("30d", dt.timedelta(days=30)), ("1h30m", dt.timedelta(minutes=90)), ("45s", dt.timedelta(seconds=45))])
def test_durations(text: str, want: dt.timedelta) -> None:
    assert pki.parse_duration(text) == want


@pytest.mark.parametrize("text", ["", "h", "5x", "-1h", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        pki.parse_duration(text)


def test_renew_before_must_be_shorter_than_validity() -> None:
    with pytest.raises(ConfigError):
        pki.plan(None, NAMES, NOW, dt.timedelta(days=400))


def test_ca_bundle_patch_targets_service_webhooks_only() -> None:
    mwc = {
        "webhooks": [
            {"name": "url.example", "clientConfig": {"url": "https://127.0.0.1:8443/mutate"}},
            {"name": "pods.clusterregistry.io", "clientConfig": {"service": {"name": "cr-webhook", "namespace": "cluster-registry"}}},
            {"name": "other.io", "clientConfig": {"service": {"name": "other", "namespace": "cluster-registry"}}},
            {"name": "same.io", "clientConfig": {"caBundle": "QUJD", "service": {"name": "cr-webhook", "namespace": "cluster-registry"}}},
        ]
    }
    ops = ca_bundle_patch(mwc, "cr-webhook", "cluster-registry", "QUJD")
    assert ops == [
        {"op": "test", "path": "/webhooks/1/name", "value": "pods.clusterregistry.io"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "QUJD"},
    ]
    assert ca_bundle_patch({"webhooks": None}, "cr-webhook", "cluster-registry", "QUJD") == []


def test_long_service_names_fit_the_common_name_limit() -> None:
    names = pki.service_names("cluster-registry-e2e-" + "x" * 30 + "-webhook", "a-namespace-with-a-rather-long-name")
    assert len(names[0]) > 64
    d = pki.plan(None, names, NOW, MONTH)
    sans = cert(d.data).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == names


# -- the registry's serving certificate (registryTLS, #15): issued from the webhook's CA -----------

REGISTRY_NAMES = pki.service_names("cr-registry", "cluster-registry", short=True)


def test_registry_certificate_lifecycle_follows_the_webhook_ca() -> None:
    ca = pki.plan(None, NAMES, NOW, MONTH).data
    made = pki.issued(None, ca, REGISTRY_NAMES, NOW, MONTH)
    assert made.action is pki.Action.CREATE and set(made.data) == {"ca.crt", "tls.crt", "tls.key"}, "never the CA key"
    assert made.data["ca.crt"] == pki.bundle(ca)
    cert(made.data).verify_directly_issued_by(cert(ca, pki.CA_CERT))
    sans = cert(made.data).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "cr-registry", "cr-registry.cluster-registry", "cr-registry.cluster-registry.svc",
        "cr-registry.cluster-registry.svc.cluster.local"]

    assert pki.issued(made.data, ca, REGISTRY_NAMES, NOW, MONTH) == pki.Decision(pki.Action.KEEP, "valid", made.data)
    later = NOW + pki.SERVING_VALIDITY - MONTH
    renewed = pki.issued(made.data, ca, REGISTRY_NAMES, later, MONTH)
    assert renewed.action is pki.Action.RENEW and renewed.data["tls.crt"] != made.data["tls.crt"]

    # a new CA (regenerated): the registry's certificate no longer chains to it, so it is reissued,
    # and its clients' bundle holds both CAs during the overlap
    new_ca = pki.plan({**ca, pki.CA_KEY: b"broken"}, NAMES, NOW, MONTH)
    assert new_ca.action is pki.Action.REGENERATE
    moved = pki.issued(made.data, new_ca.data, REGISTRY_NAMES, NOW, MONTH)
    assert moved.action is pki.Action.RENEW and moved.data["ca.crt"] == pki.bundle(new_ca.data)
    assert ca["ca.crt"] in moved.data["ca.crt"], "the old CA stays trusted during the overlap"
    # the overlap ends: the bundle shrinks, the certificate stays
    trimmed = pki.plan(new_ca.data, NAMES, NOW + pki.OVERLAP, MONTH)
    assert trimmed.action is pki.Action.TRIM
    after = pki.issued(moved.data, trimmed.data, REGISTRY_NAMES, NOW + pki.OVERLAP, MONTH)
    assert after.action is pki.Action.TRIM and after.data["tls.crt"] == moved.data["tls.crt"]
    assert after.data["ca.crt"] == trimmed.data["ca.crt"]
