"""The webhook's certificates, as pure functions: the time is passed in, nothing is read or written.

A long-lived CA (ten years) signs a serving certificate for the webhook Service
(``<service>.<ns>.svc`` and ``<service>.<ns>.svc.cluster.local``). The serving certificate is renewed
with the *same* CA when it is about to expire, so the caBundle in the MutatingWebhookConfiguration
stays valid across renewals; only a missing, broken or expiring CA makes a new CA (and a new bundle).
Keys are ECDSA P-256.

A new CA overlaps the old one: the Secret keeps the old CA certificate (``ca-previous.crt``) for
``OVERLAP`` after the change, and the caBundle holds both (:func:`bundle`), published *before* the
Secret changes. Webhook replicas serving the old certificate and those already serving the new one
are trusted alike; once the overlap is over, a later run drops the old CA (``TRIM``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster_registry import units
from cluster_registry.errors import ConfigError

CA_VALIDITY = dt.timedelta(days=3650)
SERVING_VALIDITY = dt.timedelta(days=365)
BACKDATE = dt.timedelta(minutes=5)  # tolerate clock skew between nodes
CA_CERT, TLS_CERT, TLS_KEY, CA_KEY = "ca.crt", "tls.crt", "tls.key", "ca.key"
CA_PREVIOUS, ROTATED_AT = "ca-previous.crt", "ca-rotated-at"  # the replaced CA, and when (ISO 8601)
OVERLAP = dt.timedelta(hours=1)  # every webhook replica reloads its files within minutes


class Action(str, Enum):
    KEEP = "unchanged"
    CREATE = "created"  # no Secret yet
    RENEW = "renewed"  # new serving certificate, same CA
    REGENERATE = "regenerated"  # new CA and serving certificate (the old CA stays in the bundle a while)
    TRIM = "trimmed"  # the previous CA's overlap is over: it leaves the Secret and the bundle


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    data: dict[str, bytes]  # the Secret's data (PEM), whatever the action


def service_names(service: str, namespace: str, short: bool = False) -> list[str]:
    """The Service's DNS names a client may verify; SHORT adds ``<svc>`` and ``<svc>.<ns>`` (pods
    reach the registry by those too; the API server calls a webhook by the ``.svc`` name only)."""
    names = [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    return [service, f"{service}.{namespace}", *names] if short else names


def parse_duration(text: str) -> dt.timedelta:
    """``720h``, ``30d``, ``1h30m``, ``90s`` (Go-style units plus days, whole numbers)."""
    return dt.timedelta(seconds=units.parse_duration(text, days=True, fractions=False))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(now: dt.datetime, common_name: str = "cluster-registry-webhook-ca", validity: dt.timedelta = CA_VALIDITY) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def new_serving(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    dns_names: list[str],
    now: dt.datetime,
    validity: dt.timedelta = SERVING_VALIDITY,
    ip_addresses: list[str] = [],  # noqa: B006 - never mutated
) -> tuple[bytes, bytes]:
    """A serving certificate for ``dns_names`` (and IPs) signed by the CA: (certificate PEM, key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key must be an ECDSA key")
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        # A CN is capped at 64 characters; the SANs, not the CN, are what clients verify.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ip_addresses)[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=False, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def _same_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, pub) == key.public_key().public_bytes(enc, pub)


def ca_problem(data: dict[str, bytes], now: dt.datetime, renew_before: dt.timedelta) -> str | None:
    """Why the CA in ``data`` cannot be kept, or None."""
    if CA_CERT not in data or CA_KEY not in data:
        return "no CA certificate and key"
    try:
        ca = x509.load_pem_x509_certificate(data[CA_CERT])
        if not _same_key(ca, data[CA_KEY]):
            return "the CA key does not match the CA certificate"
    except ValueError as err:
        return f"unreadable CA: {err}"
    if ca.not_valid_after_utc - now <= renew_before:
        return f"the CA expires at {ca.not_valid_after_utc.isoformat()}"
    return None


def serving_problem(
    data: dict[str, bytes], dns_names: list[str], now: dt.datetime, renew_before: dt.timedelta
) -> str | None:
    """Why the serving certificate in ``data`` must be renewed, or None. Assumes a good CA."""
    if TLS_CERT not in data or TLS_KEY not in data:
        return "no serving certificate and key"
    try:
        ca = x509.load_pem_x509_certificate(data[CA_CERT])
        cert = x509.load_pem_x509_certificate(data[TLS_CERT])
        if not _same_key(cert, data[TLS_KEY]):
            return "the serving key does not match its certificate"
    except ValueError as err:
        return f"unreadable serving certificate: {err}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "the serving certificate is not signed by the CA"
    try:
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        have = set()
    if missing := set(dns_names) - have:
        return f"the serving certificate does not cover {', '.join(sorted(missing))}"
    if cert.not_valid_before_utc > now:
        return "the serving certificate is not valid yet"
    if cert.not_valid_after_utc - now <= renew_before:
        return f"the serving certificate expires at {cert.not_valid_after_utc.isoformat()}"
    return None


def plan(
    existing: dict[str, bytes] | None,
    dns_names: list[str],
    now: dt.datetime,
    renew_before: dt.timedelta,
    serving_validity: dt.timedelta = SERVING_VALIDITY,
) -> Decision:
    """What to do with the Secret's current ``existing`` data (None: the Secret does not exist)."""
    if renew_before >= serving_validity:
        raise ConfigError(f"--renew-before ({renew_before}) must be shorter than the certificate's validity ({serving_validity})")
    data = dict(existing or {})
    if existing is None or (reason := ca_problem(data, now, renew_before)) is not None:
        ca_cert, ca_key = new_ca(now)
        cert, key = new_serving(ca_cert, ca_key, dns_names, now, serving_validity)
        fresh = {CA_CERT: ca_cert, CA_KEY: ca_key, TLS_CERT: cert, TLS_KEY: key}
        if existing is None:
            return Decision(Action.CREATE, "no Secret", fresh)
        if _usable(data.get(CA_CERT), now):  # the webhook may still serve a certificate it signed
            fresh |= {CA_PREVIOUS: data[CA_CERT], ROTATED_AT: now.isoformat().encode()}
        return Decision(Action.REGENERATE, str(reason), fresh)
    if (reason := serving_problem(data, dns_names, now, renew_before)) is not None:
        cert, key = new_serving(data[CA_CERT], data[CA_KEY], dns_names, now, serving_validity)
        return Decision(Action.RENEW, reason, {**data, TLS_CERT: cert, TLS_KEY: key})
    if CA_PREVIOUS in data and _overlap_over(data, now):
        trimmed = {k: v for k, v in data.items() if k not in (CA_PREVIOUS, ROTATED_AT)}
        return Decision(Action.TRIM, "the previous CA's overlap is over", trimmed)
    return Decision(Action.KEEP, "valid", data)


def issued(
    existing: dict[str, bytes] | None,
    ca: dict[str, bytes],
    dns_names: list[str],
    now: dt.datetime,
    renew_before: dt.timedelta,
    serving_validity: dt.timedelta = SERVING_VALIDITY,
) -> Decision:
    """A second serving certificate signed by the CA in ``ca`` (a Secret's data as :func:`plan` left
    it): the Secret holds ``tls.crt``, ``tls.key`` and the trust ``bundle`` as ``ca.crt``, never the
    CA's key. Renewed when :func:`serving_problem` says so (a new CA included), the bundle follows."""
    data = {k: v for k, v in (existing or {}).items() if k in (TLS_CERT, TLS_KEY)}
    trust = bundle(ca)
    if (reason := serving_problem({**data, CA_CERT: ca[CA_CERT]}, dns_names, now, renew_before)) is not None:
        cert, key = new_serving(ca[CA_CERT], ca[CA_KEY], dns_names, now, serving_validity)
        action = Action.CREATE if existing is None else Action.RENEW
        return Decision(action, reason, {CA_CERT: trust, TLS_CERT: cert, TLS_KEY: key})
    if (existing or {}).get(CA_CERT) != trust:
        return Decision(Action.TRIM, "the trusted CAs changed", {**data, CA_CERT: trust})
    return Decision(Action.KEEP, "valid", {**data, CA_CERT: trust})


def bundle(data: dict[str, bytes]) -> bytes:
    """The caBundle for the Secret's ``data``: its CA, and the previous one during the overlap."""
    return data[CA_CERT] + data.get(CA_PREVIOUS, b"")


def _usable(ca_pem: bytes | None, now: dt.datetime) -> bool:
    try:
        return ca_pem is not None and x509.load_pem_x509_certificate(ca_pem).not_valid_after_utc > now
    except ValueError:
        return False


def _overlap_over(data: dict[str, bytes], now: dt.datetime) -> bool:
    try:
        rotated = dt.datetime.fromisoformat(data.get(ROTATED_AT, b"").decode())
    except ValueError:
        return True  # no readable time: the overlap cannot be vouched for any more
    return now - rotated >= OVERLAP or not _usable(data.get(CA_PREVIOUS), now)


def fingerprint(cert_pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint (hex)."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def not_after(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
