"""The copy engine through the fault-injecting proxy: transient faults are survived, persistent
corruption fails the copy, and a failed copy leaves nothing tagged at the destination."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster_registry import reference
from cluster_registry.oci import (
    CopyOptions,
    CorruptBlobError,
    RateLimitedError,
    RegistryOptions,
    RegistrySession,
    RegistryUnavailableError,
    RetryPolicy,
    copy_image,
)
from cluster_registry.oci.copy import CopyResult
from tests.support.ociimages import Image, Pusher, assert_copied, push_image
from tests.support.proxy import Fault, FaultProxy
from tests.support.registry import Registry, run_registry

BLOB_GET = r"^GET /v2/app/blobs/sha256:"
RETRY = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Image]]:
    with run_registry(tmp_path_factory.mktemp("src")) as reg:
        img = push_image(Pusher(reg.host), "app", "1", layers=[700_000, 300_000, 1_200_000], seed=21)
        yield reg, img


async def run_copy(proxy: FaultProxy, dst: Registry, retry: RetryPolicy = RETRY, threads: bool = False) -> CopyResult:
    """``threads``: stream every blob on worker threads (``blobio``) instead of the event loop."""
    opts = RegistryOptions(insecure_hosts=frozenset({proxy.host, dst.host}), retry=retry)
    async with RegistrySession(opts) as s:
        return await copy_image(
            reference.parse(f"{proxy.host}/app:1"), reference.parse(f"{dst.host}/app:1"), session=s,
            options=CopyOptions(thread_threshold=0 if threads else -1),
        )


THREADS = pytest.mark.parametrize("threads", [False, True], ids=["loop", "threads"])


@pytest.mark.parametrize(
    "faults",
    [
        [Fault("429", BLOB_GET, times=2, retry_after="1")],
        [Fault("5xx", r"^GET /v2/app/manifests/1", times=2, status=503), Fault("5xx", BLOB_GET, times=1, status=502)],
        [Fault("reset", BLOB_GET, times=2)],
        [Fault("truncate", BLOB_GET, times=2)],
        [Fault("flip", BLOB_GET, times=1)],
    ],
    ids=["429-retry-after", "5xx", "reset", "truncate", "flipped-byte-once"],
)
@THREADS
async def test_transient_faults_are_survived(
    src: tuple[Registry, Image], dst: Registry, faults: list[Fault], threads: bool
) -> None:
    reg, img = src
    faults = [Fault(f.kind, f.match, f.times, f.status, f.retry_after) for f in faults]  # fresh hit counts
    with FaultProxy(reg.url, faults) as proxy:
        result = await run_copy(proxy, dst, threads=threads)
        injected = [entry for entry in proxy.log if entry[2] in {f.kind for f in faults}]
    assert all(f.hits == f.times for f in faults), "every fault was injected"
    assert len(injected) == sum(f.times for f in faults)
    assert result.digest == img.digest and result.blobs_copied == 4
    assert_copied(Pusher(reg.host), Pusher(dst.host), img, "app")


async def test_retry_after_is_honoured(src: tuple[Registry, Image], dst: Registry) -> None:
    reg, _ = src
    with FaultProxy(reg.url, [Fault("429", r"^GET /v2/app/manifests/1", times=1, retry_after="2")]) as proxy:
        result = await run_copy(proxy, dst)
    assert result.seconds >= 1.9  # waited as told, not the 0.05 s backoff


@pytest.mark.parametrize(
    ("fault", "error", "temporary"),
    [
        (Fault("flip", BLOB_GET, times=-1), CorruptBlobError, False),
        (Fault("truncate", BLOB_GET, times=-1), RegistryUnavailableError, True),
        (Fault("5xx", BLOB_GET, times=-1, status=500), RegistryUnavailableError, True),
        (Fault("429", BLOB_GET, times=-1, retry_after="0"), RateLimitedError, True),
    ],
    ids=["corrupt", "truncated", "500", "429"],
)
@THREADS
async def test_persistent_faults_fail_and_leave_nothing_tagged(
    src: tuple[Registry, Image], dst: Registry, fault: Fault, error: type[Exception], temporary: bool, threads: bool
) -> None:
    reg, img = src
    fault = Fault(fault.kind, fault.match, fault.times, fault.status, fault.retry_after)
    with FaultProxy(reg.url, [fault]) as proxy:
        with pytest.raises(error) as err:
            await run_copy(proxy, dst, threads=threads)
    assert err.value.temporary is temporary  # type: ignore[attr-defined]
    assert "/app@sha256:" in str(err.value)  # names the blob at fault
    dp = Pusher(dst.host)
    assert dp.get_manifest("app", "1") is None, "nothing tagged"
    assert dp.get_manifest("app", img.digest) is None, "top manifest not pushed"
    assert dp.tags("app") == []
    # bounded: per blob at most attempts (blob level) x attempts (request level) tries
    assert fault.hits <= RETRY.attempts * RETRY.attempts * len(img.blobs)
