"""The token service's JWTs as distribution v3 verifies them (``registry/auth/token``), pure but for the
key generation helper.

- Signed ES256 with a P-256 key kept in a Secret; the header names the key by ``kid``, its RFC 7638
  thumbprint, which distribution looks up in the JWKS file its ``auth.token.jwks`` option names (the
  Secret's ``jwks.json``: the current public key and, during a rotation, the previous one).
- Claims: ``iss`` (``auth.token.issuer``), ``aud`` (``auth.token.service``), ``sub``, ``iat``, ``nbf``,
  ``exp``, ``jti`` and ``access`` (the grants).
- **Lifetime**: distribution accepts a token until ``exp`` plus a fixed, unconfigurable 60 s leeway
  (``token.Leeway``). The write lock needs push tokens that die when we say, so ``exp`` is set to
  ``iat + ttl - 60``: at distribution a token lives ``ttl`` seconds (nodes' clocks in sync), which is
  also the ``expires_in`` clients are told. ``nbf`` is ``iat``; distribution allows 60 s of skew there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cluster_registry.errors import ConfigError
from cluster_registry.gate.access import Scope

DISTRIBUTION_LEEWAY = 60  # seconds distribution adds to exp (registry/auth/token/token.go: Leeway)
ALGORITHM = "ES256"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = key.public_numbers()
    jwk = {"crv": "P-256", "kty": "EC", "x": _b64(nums.x), "y": _b64(nums.y)}
    # RFC 7638: SHA-256 of the required members, sorted, no whitespace.
    thumb = hashlib.sha256(json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()).digest()
    return {**jwk, "kid": base64.urlsafe_b64encode(thumb).rstrip(b"=").decode(), "use": "sig", "alg": ALGORITHM}


def jwks(*keys: ec.EllipticCurvePublicKey) -> str:
    """The JWKS document distribution trusts (``auth.token.jwks``)."""
    return json.dumps({"keys": [public_jwk(k) for k in keys]}, sort_keys=True) + "\n"


def new_private_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Signer:
    key: ec.EllipticCurvePrivateKey
    kid: str
    issuer: str
    service: str


def load_signer(pem: bytes, issuer: str, service: str) -> Signer:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"the token signing key is not a PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError("the token signing key must be an EC P-256 key (ES256)")
    return Signer(key, public_jwk(key.public_key())["kid"], issuer, service)


def issue(signer: Signer, subject: str, grants: tuple[Scope, ...], ttl: int, now: float) -> str:
    """A token ``subject`` can use for ``ttl`` seconds from ``now`` (Unix seconds) at distribution."""
    iat = int(now)
    claims: dict[str, Any] = {
        "iss": signer.issuer,
        "sub": subject,
        "aud": signer.service,
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl - DISTRIBUTION_LEEWAY,
        "jti": secrets.token_urlsafe(12),
        "access": [g.claim() for g in grants],
    }
    return jwt.encode(claims, signer.key, algorithm=ALGORITHM, headers={"kid": signer.kid, "typ": "JWT"})
