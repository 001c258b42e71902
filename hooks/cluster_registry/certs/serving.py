"""A server SSL context following its certificate files: the webhook and the token service serve with it.

TLS 1.2 or newer; the certificate and key files are polled and, when their contents change and the
new pair loads, swapped into the live SSL context so new connections get the new certificate with no
restart (a Secret volume's atomic symlink swap, cert-manager, or ``certs`` renewing the Secret).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl

log = logging.getLogger(__name__)


class TlsFiles:
    """A server SSL context whose certificate follows the files ``cert`` and ``key``."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.fingerprint = ""
        self.reloads = 0

    @property
    def loaded(self) -> bool:
        return bool(self.fingerprint)

    def _read(self) -> tuple[bytes, bytes]:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k:
            return c.read(), k.read()

    def reload_if_changed(self) -> bool:
        """Load the files if they changed and form a valid pair; True if the certificate changed."""
        cert, key = self._read()
        fingerprint = hashlib.sha256(cert + b"\0" + key).hexdigest()
        if fingerprint == self.fingerprint:
            return False
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trial.load_cert_chain(self.cert, self.key)  # raises on a half-written or mismatched pair
        self.context.load_cert_chain(self.cert, self.key)
        first = not self.fingerprint
        self.fingerprint = fingerprint
        self.reloads += 1
        log.info("TLS certificate %s", "loaded" if first else "reloaded", extra={"sha256": fingerprint[:16]})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except (OSError, ssl.SSLError) as err:
                log.warning("TLS files not reloaded (keeping the current certificate): %s", err)
