"""The one check of a blob as it streams (pure): size and digest, the last chunk held back until both hold.

Both blob paths use it: ``Repository.open_blob`` (chunks through the event loop) and
``blobio.transfer`` (GET to PUT on one worker thread). A consumer forwards what :meth:`Verifier.feed`
returns and, at the end of the body, what :meth:`Verifier.finish` returns: it never forwards the end
of content that does not verify, so an upload fed from a corrupt source is never completed.

Errors (``what`` names the blob): the response announcing another length than the descriptor's, more
bytes than it, a complete body shorter than it, or content with another digest: ``CorruptBlobError``.
A connection cut before the response's own end is the reader's to report (a transport error,
``RegistryUnavailableError``): the source may serve the blob whole on a retry.
"""

from __future__ import annotations

import hashlib
from typing import Generic, TypeVar

from cluster_registry.oci import media
from cluster_registry.oci.errors import CorruptBlobError

_Chunk = TypeVar("_Chunk", bytes, memoryview)


class Verifier(Generic[_Chunk]):
    def __init__(self, digest: str, size: int | None, what: str) -> None:
        self.digest, self.size, self.what = digest, size, what
        self.algorithm = media.check_digest(digest).split(":", 1)[0]
        self._hasher = hashlib.new(self.algorithm)
        self.got = 0
        self._held: _Chunk | None = None

    def announced(self, content_length: int | None) -> None:
        """The response's Content-Length, checked against the descriptor before any byte is read."""
        if content_length is not None and self.size is not None and content_length != self.size:
            raise CorruptBlobError(f"{self.what}: registry serves {content_length} bytes, the descriptor says {self.size}")

    def feed(self, chunk: _Chunk) -> _Chunk | None:
        """Account for ``chunk``; returns the chunk before it, now safe to forward (None at first)."""
        self._hasher.update(chunk)
        self.got += len(chunk)
        if self.size is not None and self.got > self.size:
            raise CorruptBlobError(f"{self.what}: registry sent more than the {self.size} bytes the descriptor says")
        ready, self._held = self._held, chunk
        return ready

    def finish(self) -> _Chunk | None:
        """The body ended: verify size and digest; returns the last chunk (None for an empty blob)."""
        if self.size is not None and self.got != self.size:
            raise CorruptBlobError(f"{self.what}: registry sent {self.got} bytes, the descriptor says {self.size} (truncated)")
        actual = f"{self.algorithm}:{self._hasher.hexdigest()}"
        if actual != self.digest:
            raise CorruptBlobError(f"{self.what}: content hashes to {actual}: the source served corrupt data")
        held, self._held = self._held, None
        return held
