"""oci.verify.Verifier: the one size and digest check of both blob paths (open_blob and blobio.transfer)."""

from __future__ import annotations

import hashlib

import pytest

from cluster_registry.oci.errors import CorruptBlobError
from cluster_registry.oci.verify import Verifier

DATA = b"0123456789" * 10
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def stream(check: Verifier[bytes], chunks: list[bytes]) -> bytes:
    out = [r for c in chunks if (r := check.feed(c)) is not None]
    last = check.finish()
    return b"".join(out + ([last] if last is not None else []))


def test_forwards_everything_and_the_last_chunk_only_after_verifying() -> None:
    check: Verifier[bytes] = Verifier(DIGEST, len(DATA), "blob")
    chunks = [DATA[i : i + 30] for i in range(0, len(DATA), 30)]
    forwarded = [check.feed(c) for c in chunks]
    assert forwarded[0] is None and forwarded[1:] == chunks[:-1], "each chunk is held until the next arrives"
    assert check.finish() == chunks[-1]


@pytest.mark.parametrize(
    ("size", "chunks", "message"),
    [
        (len(DATA), [DATA[:50]], "registry sent 50 bytes, the descriptor says 100 (truncated)"),  # a complete but short body
        (len(DATA), [DATA, b"x"], "more than the 100 bytes"),
        (len(DATA), [DATA[:-1] + b"?"], "content hashes to sha256:"),
    ],
    ids=["short", "long", "corrupt"],
)
def test_what_does_not_verify_is_corrupt_on_both_paths(size: int, chunks: list[bytes], message: str) -> None:
    with pytest.raises(CorruptBlobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stream(Verifier(DIGEST, size, "blob"), chunks)


def test_an_announced_length_other_than_the_descriptor_is_refused_before_reading() -> None:
    check: Verifier[bytes] = Verifier(DIGEST, len(DATA), "get blob r/app")
    check.announced(len(DATA))
    check.announced(None)  # chunked: checked at the end instead
    with pytest.raises(CorruptBlobError, match="registry serves 99 bytes, the descriptor says 100"):
        check.announced(99)


def test_unknown_size_checks_the_digest_only() -> None:
    assert stream(Verifier(DIGEST, None, "blob"), [DATA[:7], DATA[7:]]) == DATA
