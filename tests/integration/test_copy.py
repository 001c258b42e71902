"""The copy engine against real distribution v3 registries on loopback."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster_registry import reference
from cluster_registry.errors import PermanentError, WriteLockedError
from cluster_registry.oci import (
    AuthenticationError,
    CopyOptions,
    CopyResult,
    Credentials,
    NotFoundError,
    RegistryOptions,
    RegistrySession,
    RetryPolicy,
    TLSError,
    copy_image,
)
from tests.support.ociimages import PLATFORMS, Pusher, assert_copied, push_image, push_index, push_referrer, push_signature
from tests.support.proxy import Fault, FaultProxy
from tests.support.registry import Registry, TokenServer, run_registry

ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.2)


def options(*hosts: str, **kw: object) -> RegistryOptions:
    return RegistryOptions(insecure_hosts=frozenset(hosts), retry=FAST_RETRY, **kw)  # type: ignore[arg-type]


async def copy(src: str, dst: str, *hosts: str, session: RegistrySession | None = None, **kw: object) -> CopyResult:
    if session is not None:
        return await copy_image(reference.parse(src), reference.parse(dst), session=session, **kw)  # type: ignore[arg-type]
    async with RegistrySession(options(*hosts)) as s:
        return await copy_image(reference.parse(src), reference.parse(dst), session=s, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-schema2"])
async def test_single_platform(src: Registry, dst: Registry, docker: bool) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    img = push_image(sp, "team/app", "1.0", layers=[300_000, 1, 2_500_000], seed=7, docker=docker)
    result = await copy(f"{src.host}/team/app:1.0", f"{dst.host}/mirror/team/app:1.0", src.host, dst.host)
    assert result.digest == img.digest
    assert result.media_type == img.media_type
    assert result.platforms == ("linux/amd64",)
    assert (result.blobs_copied, result.blobs_skipped, result.blobs_mounted) == (4, 0, 0)
    assert result.bytes_copied == sum(s for _, s in img.blobs)
    assert result.size == result.bytes_copied + len(img.manifest)
    assert_copied(sp, dp, img, "mirror/team/app")
    got = dp.get_manifest("mirror/team/app", "1.0")
    assert got is not None and got[0] == img.manifest  # tag holds the exact bytes

    again = await copy(f"{src.host}/team/app:1.0", f"{dst.host}/mirror/team/app:1.0", src.host, dst.host)
    assert again.digest == img.digest and again.blobs_copied == 0 and again.bytes_copied == 0
    assert again.size == result.size and again.platforms == ("linux/amd64",)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
async def test_multi_platform_index(src: Registry, dst: Registry, docker: bool) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    idx = push_index(sp, "multi", "v2", PLATFORMS[:3], layers=[200_000, 100_000], seed=3, docker=docker, shared_base=150_000)
    result = await copy(f"{src.host}/multi:v2", f"{dst.host}/multi:v2", src.host, dst.host)
    assert result.digest == idx.digest and result.media_type == idx.media_type
    assert result.platforms == ("linux/amd64", "linux/arm64/v8", "linux/s390x")
    unique = idx.all_blobs()
    assert len(unique) == 1 + 3 * 3  # the shared base layer once, 2 layers + config per platform
    assert result.blobs_copied == len(unique)
    assert result.bytes_copied == sum(s for _, s in unique)
    assert_copied(sp, dp, idx, "multi")
    got = dp.get_manifest("multi", "v2")
    assert got is not None and got[0] == idx.manifest


async def test_digest_pinned(src: Registry, dst: Registry) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    img = push_image(sp, "pinned", "t", layers=[50_000], seed=11)
    # digest only: pushed by digest, no tag appears
    r = await copy(f"{src.host}/pinned@{img.digest}", f"{dst.host}/pinned@{img.digest}", src.host, dst.host)
    assert r.digest == img.digest
    assert dp.tags("pinned") == []
    assert_copied(sp, dp, img, "pinned")
    # tag + digest: the digest wins for the fetch and the push; the tag is never moved (#15: another
    # namespace's `other:t` must not be repointed by a copy pinned to an older digest)
    newer = push_image(sp, "other", "t", layers=[40_000], seed=12)
    await copy(f"{src.host}/other:t", f"{dst.host}/other:t", src.host, dst.host)
    r = await copy(f"{src.host}/pinned:t@{img.digest}", f"{dst.host}/other:t@{img.digest}", src.host, dst.host)
    assert r.digest == img.digest and dp.tags("other") == ["t"]
    tagged, pinned = dp.get_manifest("other", "t"), dp.get_manifest("other", img.digest)
    assert tagged is not None and tagged[0] == newer.manifest and pinned is not None and pinned[0] == img.manifest
    # a digest the source lacks
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError) as err:
        await copy(f"{src.host}/pinned@{missing}", f"{dst.host}/pinned@{missing}", src.host, dst.host)
    assert missing in str(err.value) and not err.value.temporary
    # a destination pinned to another digest is refused
    with pytest.raises(PermanentError):
        await copy(f"{src.host}/pinned:t", f"{dst.host}/pinned@{missing}", src.host, dst.host)


async def test_signatures_and_referrers(src: Registry, dst: Registry) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    img = push_image(sp, "signed", "1", layers=[10_000], seed=5)
    sig = push_signature(sp, "signed", img.digest)
    att = push_signature(sp, "signed", img.digest, suffix="att")
    sbom = push_referrer(sp, "signed", img)
    other = push_image(sp, "signed", "2", layers=[10_000], seed=6)
    push_signature(sp, "signed", other.digest)  # belongs to another image: must not come along
    result = await copy(f"{src.host}/signed:1", f"{dst.host}/signed:1", src.host, dst.host)
    prefix = img.digest.replace(":", "-")
    assert sorted(dp.tags("signed")) == sorted(["1", f"{prefix}.sig", f"{prefix}.att", prefix])
    assert set(result.attached) >= {sig.digest, att.digest, sbom.digest}
    for art in (sig, att, sbom):
        assert_copied(sp, dp, art, "signed")
    fallback = dp.get_manifest("signed", prefix)
    assert fallback is not None and sbom.digest in fallback[0].decode()


async def test_platform_signatures_of_an_index_come_along(src: Registry, dst: Registry) -> None:
    # `cosign sign --recursive` signs the index and each platform manifest
    sp, dp = Pusher(src.host), Pusher(dst.host)
    idx = push_index(sp, "multi/signed", "1", PLATFORMS[:2], layers=[5_000], seed=41)
    sigs = [push_signature(sp, "multi/signed", m.digest) for m in (idx, *idx.children)]
    sbom = push_referrer(sp, "multi/signed", idx.children[1])
    result = await copy(f"{src.host}/multi/signed:1", f"{dst.host}/multi/signed:1", src.host, dst.host)
    assert set(result.attached) >= {s.digest for s in sigs} | {sbom.digest}
    for art in (*sigs, sbom):
        assert_copied(sp, dp, art, "multi/signed")
    assert {f"{m.digest.replace(':', '-')}.sig" for m in (idx, *idx.children)} <= set(dp.tags("multi/signed"))


async def test_cross_repository_mount(src: Registry, dst: Registry) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    img = push_image(sp, "base", "1", layers=[100_000, 100_000], seed=9)
    async with RegistrySession(options(src.host, dst.host)) as s:
        first = await copy(f"{src.host}/base:1", f"{dst.host}/a/base:1", session=s)
        second = await copy(f"{src.host}/base:1", f"{dst.host}/b/base:1", session=s)
        # same registry, other repository: mounted from the source repository
        third = await copy(f"{dst.host}/a/base:1", f"{dst.host}/c/base:1", session=s)
    assert first.blobs_copied == 3
    assert (second.blobs_copied, second.blobs_mounted) == (0, 3)
    assert (third.blobs_copied, third.blobs_mounted) == (0, 3)
    for repo in ("a/base", "b/base", "c/base"):
        assert_copied(sp, dp, img, repo)


async def test_basic_auth(tmp_path: Path, src: Registry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    with run_registry(tmp_path / "auth", htpasswd=("pusher", "s3cret-pw")) as dst:
        img = push_image(Pusher(src.host), "app", "1", layers=[20_000], seed=1)
        r = await copy(f"{src.host}/app:1", f"{dst.host}/app:1", src.host, dst.host,
                       dst_auth=Credentials("pusher", "s3cret-pw"))
        assert r.digest == img.digest
        assert_copied(Pusher(src.host), Pusher(dst.host, auth=("pusher", "s3cret-pw")), img, "app")
        for auth in (None, Credentials("pusher", "wrong-pw-123")):
            with pytest.raises(AuthenticationError) as err:
                await copy(f"{src.host}/app:1", f"{dst.host}/app:2", src.host, dst.host, dst_auth=auth)
            assert "wrong-pw-123" not in str(err.value) and "s3cret" not in str(err.value)
            assert dst.host in str(err.value)
    assert "s3cret" not in caplog.text and "wrong-pw-123" not in caplog.text
    assert "cHVzaGVy" not in caplog.text  # base64 of the user name: no Authorization header logged


@dataclass
class PublicExceptPrivate(FaultProxy):
    """A host serving every repository to anyone but ``private/`` ones (it lends the credentials),
    as registries with public and private repositories behind HTTP basic auth do."""

    basic: str = ""

    async def _handle(self, request: Any) -> Any:
        if "Authorization" not in request.headers and not request.path.startswith("/v2/private/"):
            request = request.clone(headers={**request.headers, "Authorization": self.basic})
        return await super()._handle(request)


async def test_anonymous_pulls_of_public_repositories_on_a_host_that_challenged(tmp_path: Path, dst: Registry) -> None:
    """One session (a reconciler's) copies a private image with credentials, then public ones of the
    same host without: the host's remembered basic challenge must not stop anonymous requests."""
    with run_registry(tmp_path / "store", htpasswd=("u", "store-pw")) as store:
        pusher = Pusher(store.host, auth=("u", "store-pw"))
        private = push_image(pusher, "private/app", "1", layers=[30_000], seed=21)
        public = push_image(pusher, "cnf/app", "1", layers=[40_000, 5_000_000], seed=22)  # one over 4 MiB: blob threads
        basic = "Basic " + base64.b64encode(b"u:store-pw").decode()
        with PublicExceptPrivate(store.url, basic=basic) as front:
            async with RegistrySession(options(front.host, dst.host)) as session:
                r = await copy(f"{front.host}/private/app:1", f"{dst.host}/private/app:1", session=session,
                               src_auth=Credentials("u", "store-pw"))
                assert r.digest == private.digest
                assert (await copy(f"{front.host}/cnf/app:1", f"{dst.host}/cnf/app:1", session=session)).digest == public.digest
                with pytest.raises(AuthenticationError, match="requires credentials and none were given"):
                    await copy(f"{front.host}/private/app:1", f"{dst.host}/private/again:1", session=session)
    assert_copied(Pusher(store.host, auth=("u", "store-pw")), Pusher(dst.host), public, "cnf/app")


async def test_token_auth(tmp_path: Path, dst: Registry) -> None:
    with TokenServer(users={"reader": "tok-pw"}) as ts, run_registry(tmp_path / "tok", token=ts) as src:
        sp = Pusher(src.host, auth=("reader", "tok-pw"))
        img = push_image(sp, "org/app", "1", layers=[30_000, 40_000], seed=2)
        sig = push_signature(sp, "org/app", img.digest)
        ts.requests.clear()
        r = await copy(f"{src.host}/org/app:1", f"{dst.host}/org/app:1", src.host, dst.host,
                       src_auth=Credentials("reader", "tok-pw"), options=CopyOptions(thread_threshold=0))
        assert r.digest == img.digest and sig.digest in r.attached
        assert_copied(sp, Pusher(dst.host), img, "org/app")
        # one token for the whole copy: pull scope on the source repository only
        assert ts.requests == [("reader", ["repository:org/app:pull"])]
        with pytest.raises(AuthenticationError) as err:
            await copy(f"{src.host}/org/app:1", f"{dst.host}/x:1", src.host, dst.host,
                       src_auth=Credentials("reader", "bad-token-pw"))
        assert "bad-token-pw" not in str(err.value)


async def test_tls_with_ca_bundle(tmp_path: Path, src: Registry) -> None:
    with run_registry(tmp_path / "tls", tls=True) as dst:
        assert dst.ca_file is not None
        img = push_image(Pusher(src.host), "app", "1", layers=[20_000], seed=4)
        async with RegistrySession(options(src.host, ca_bundle=str(dst.ca_file))) as s:
            r = await copy(f"{src.host}/app:1", f"{dst.host}/app:1", session=s)
            # the worker-thread blob path speaks TLS with the same CA bundle
            r2 = await copy(f"{src.host}/app:1", f"{dst.host}/threads:1", session=s,
                            options=CopyOptions(thread_threshold=0, mount=False))
        assert r.digest == img.digest and r2.blobs_copied == 2
        assert_copied(Pusher(src.host), Pusher(dst.host, ca_file=str(dst.ca_file)), img, "app")
        assert_copied(Pusher(src.host), Pusher(dst.host, ca_file=str(dst.ca_file)), img, "threads")
        with pytest.raises(TLSError) as err:
            await copy(f"{src.host}/app:1", f"{dst.host}/app:1", src.host)
        assert "--ca-bundle" in str(err.value)


async def test_a_long_lived_session_trusts_a_ca_added_to_its_bundle(tmp_path: Path, src: Registry) -> None:
    """The reconciler keeps one session for its life; when the chart's CA is renewed, the mounted
    bundle holds the old and the new CA and the registry serves a certificate from the new one. The
    session must trust it then, without a restart (it kept its first TLS context before)."""
    img = push_image(Pusher(src.host), "app", "1", layers=[20_000], seed=5)
    with run_registry(tmp_path / "old", tls=True) as old, run_registry(tmp_path / "new", tls=True) as new:
        assert old.ca_file and new.ca_file
        bundle = tmp_path / "ca.crt"
        bundle.write_bytes(old.ca_file.read_bytes())
        async with RegistrySession(options(src.host, ca_bundle=str(bundle))) as s:
            await copy(f"{src.host}/app:1", f"{old.host}/app:1", session=s)
            with pytest.raises(TLSError):  # not trusted yet: the bundle holds the old CA only
                await copy(f"{src.host}/app:1", f"{new.host}/app:1", session=s)
            tmp = tmp_path / "ca.crt.new"  # swapped in whole, as a Secret volume does
            tmp.write_bytes(old.ca_file.read_bytes() + new.ca_file.read_bytes())
            tmp.replace(bundle)
            r = await copy(f"{src.host}/app:1", f"{new.host}/app:1", session=s)
            await copy(f"{src.host}/app:1", f"{old.host}/again:1", session=s)  # the old CA still trusted
        assert r.digest == img.digest
        assert_copied(Pusher(src.host), Pusher(new.host, ca_file=str(new.ca_file)), img, "app")


@pytest.mark.parametrize("lock_on", [r"^POST /v2/app/blobs/uploads/", r"^PUT /v2/app/manifests/1"], ids=["blobs", "tag"])
async def test_write_lock_defers_and_leaves_no_tag(src: Registry, dst: Registry, lock_on: str) -> None:
    img = push_image(Pusher(src.host), "app", "1", layers=[20_000], seed=8)
    with FaultProxy(dst.url, [Fault("lock", lock_on, times=-1)]) as proxy:
        with pytest.raises(WriteLockedError) as err:
            await copy(f"{src.host}/app:1", f"{proxy.host}/app:1", src.host, proxy.host)
        assert err.value.temporary and "garbage collection" in str(err.value)
        assert [f for f in proxy.log if f[2] == "lock"][:1]  # refused at once: no retry storm
        assert len([f for f in proxy.log if f[2] == "lock"]) <= 2
    assert Pusher(dst.host).get_manifest("app", "1") is None
    assert img.digest


async def get_manifest(ref: reference.Reference, *, session: RegistrySession) -> tuple[bytes, str, str]:
    m = await session.repository(ref.host, ref.repository).get_manifest(ref.pull_ref)
    return m.body, m.media_type, m.digest


async def list_tags(ref: reference.Reference, *, session: RegistrySession) -> list[str]:
    return await session.repository(ref.host, ref.repository).list_tags()


async def delete_manifest(ref: reference.Reference, *, session: RegistrySession) -> bool:
    """Delete ``ref``'s manifest, resolving a tag to its digest first; False if absent."""
    repo = session.repository(ref.host, ref.repository, push=True)
    digest = ref.digest
    if digest is None:
        head = await repo.head_manifest(ref.pull_ref)
        if head is None or not head[0]:
            return False
        digest = head[0]
    return await repo.delete_manifest(digest)


async def test_read_api(src: Registry) -> None:
    sp = Pusher(src.host)
    img = push_image(sp, "r/app", "1", layers=[1000], seed=12)
    push_image(sp, "r/app", "2", layers=[1000], seed=13)
    async with RegistrySession(options(src.host)) as s:
        body, mt, digest = await get_manifest(reference.parse(f"{src.host}/r/app:1"), session=s)
        assert (body, mt, digest) == (img.manifest, img.media_type, img.digest)
        assert sorted(await list_tags(reference.parse(f"{src.host}/r/app"), session=s)) == ["1", "2"]
        assert "r/app" in await s.catalog(src.host)
        assert await delete_manifest(reference.parse(f"{src.host}/r/app:1"), session=s)
        assert sorted(await list_tags(reference.parse(f"{src.host}/r/app"), session=s)) == ["2"]
        assert not await delete_manifest(reference.parse(f"{src.host}/r/app@{img.digest}"), session=s)
        repo = s.repository(src.host, "r/app")
        cfg_digest, cfg_size = img.blobs[0]
        async with await repo.open_blob(cfg_digest, cfg_size) as stream:
            data = b"".join([c async for c in stream])
        assert len(data) == cfg_size and json.loads(data)["os"] == "linux"


def test_copy_command(src: Registry, dst: Registry) -> None:
    img = push_image(Pusher(src.host), "cli/app", "1", layers=[30_000], seed=14)
    env = dict(os.environ, CLUSTER_REGISTRY_COPY_SRC_PASSWORD="unused-secret")
    out = subprocess.run(
        [sys.executable, "-m", "cluster_registry", "copy", f"{src.host}/cli/app:1", f"{dst.host}/cli/app:1",
         "--src-insecure", "--dest-insecure"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["digest"] == img.digest and summary["blobs_copied"] == 2
    assert summary["destination"] == f"{dst.host}/cli/app:1"
    bad = subprocess.run(
        [sys.executable, "-m", "cluster_registry", "copy", f"{src.host}/cli/nope:1", f"{dst.host}/cli/nope:1",
         "--src-insecure", "--dest-insecure"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert bad.returncode == 1
    err = json.loads(bad.stdout.strip().splitlines()[-1])
    assert err["reason"] == "NotFound" and err["temporary"] is False


@pytest.mark.parametrize("refuse_mount", [False, True], ids=["mount-probe", "head-fallback"])
async def test_existing_blobs_are_skipped(src: Registry, dst: Registry, refuse_mount: bool) -> None:
    sp, dp = Pusher(src.host), Pusher(dst.host)
    first = push_image(sp, "app", "a", layers=[(1000, 50_000), 60_000], seed=15)
    second = push_image(sp, "app", "b", layers=[(1000, 50_000), 70_000], seed=16)
    faults = [Fault("5xx", r"^POST /v2/app/blobs/uploads/\?.*mount=", times=-1, status=400)] if refuse_mount else []
    with FaultProxy(dst.url, faults) as proxy:
        await copy(f"{src.host}/app:a", f"{proxy.host}/app:a", src.host, proxy.host)
        r = await copy(f"{src.host}/app:b", f"{proxy.host}/app:b", src.host, proxy.host)
        heads = [e for e in proxy.log if e[0] == "HEAD" and "/blobs/" in e[1]]
    assert (r.blobs_copied, r.blobs_skipped, r.blobs_mounted) == (2, 1, 0)
    assert bool(heads) is refuse_mount  # HEAD only once the registry refused the mount probe
    assert_copied(sp, dp, first, "app")
    assert_copied(sp, dp, second, "app")
