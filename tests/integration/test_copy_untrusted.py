"""Redirects an untrusted registry sends, followed by the client and the blob threads (#16 items 7, 8):
the redirect policy applies on both paths, and a redirect's body is never read whole."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from cluster_registry.oci import RegistryOptions, RegistryProtocolError, RegistrySession, blobio
from cluster_registry.oci.errors import status_error
from tests.integration.test_copy_transport import Scripted, Seen

DATA = b"blob content " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def loopback_by_name(port_of: Scripted) -> str:
    """The same loopback server by another host name: a redirect off the registry's host to loopback."""
    return f"http://localhost:{port_of.host.rsplit(':', 1)[1]}"


async def test_client_refuses_a_redirect_to_loopback() -> None:
    def internal(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, b"<html>internal admin page: secret=hunter2</html>"

    with Scripted(internal).running() as admin:

        def reg(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
            return 307, {"Location": f"{loopback_by_name(admin)}/admin"}, b""

        with Scripted(reg).running() as registry:
            async with RegistrySession(RegistryOptions(insecure_hosts=frozenset({registry.host}))) as s:
                repo = s.repository(registry.host, "r")
                with pytest.raises(RegistryProtocolError, match="redirected to localhost: refused") as err:
                    await repo.get_manifest("latest")
    assert admin.seen == [] and "hunter2" not in str(err.value)


def test_blob_thread_bounds_a_redirect_body_and_applies_the_policy() -> None:
    """One 307 with a large body once added 400 MiB: now at most 64 KiB of it is read."""
    sent = {"bytes": 0}
    put: list[bytes] = []

    def src(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if seen.path == "/v2/r/blobs/" + DIGEST:
            h.send_response(307)
            h.send_header("Location", f"/real/{DIGEST}")
            h.send_header("Content-Length", str(1 << 30))
            h.end_headers()
            try:
                while sent["bytes"] < 1 << 30:
                    h.wfile.write(b"\0" * 65536)
                    sent["bytes"] += 65536
            except OSError:
                pass  # the client hung up
            return None
        if seen.path == "/evil":
            return 307, {"Location": f"{loopback_by_name(server)}/real/{DIGEST}"}, b""
        return 200, {"Content-Type": "application/octet-stream"}, DATA

    def dst(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        put.append(seen.body)
        return 201, {"Location": f"/v2/r/blobs/{DIGEST}"}, b""

    def error(status: int, headers: object, body: bytes, what: str) -> Exception:
        return status_error(status, headers, body, what, host="h", where="h/r")  # type: ignore[arg-type]

    pool = blobio.ConnectionPool()
    with Scripted(src).running() as source, Scripted(dst).running() as dest:
        source_ep = blobio.Endpoint(f"http://{source.host}/v2/r/blobs/{DIGEST}", {}, "get blob", error)  # type: ignore[arg-type]
        dest_ep = blobio.Endpoint(f"http://{dest.host}/upload?x=1", {}, "put blob", error)  # type: ignore[arg-type]
        blobio.transfer(pool, source_ep, dest_ep, DIGEST, len(DATA), threading.Event())
        assert put == [DATA]
        assert sent["bytes"] < 16 << 20, sent  # the redirect's body was dropped, not read
        evil = blobio.Endpoint(f"http://{source.host}/evil", {}, "get blob", error)  # type: ignore[arg-type]
        with pytest.raises(RegistryProtocolError, match="redirected to localhost"):
            blobio.transfer(pool, evil, dest_ep, DIGEST, len(DATA), threading.Event())
    pool.close()


async def test_an_image_declaring_more_than_the_maximum_size_is_refused_before_any_blob() -> None:
    """Item 8 of #16: descriptors are the registry's word; over the maximum image size, nothing is fetched."""
    import json

    from cluster_registry import reference
    from cluster_registry.oci import CopyOptions, copy_image
    from cluster_registry.oci.copy import ImageTooLargeError

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "1" * 64, "size": 100},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "2" * 64,
                    "size": 10 << 30}],
    }).encode()  # fmt: skip
    mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    def src(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if "/manifests/" in seen.path:
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": mdigest}, manifest
        return 200, {}, b"\0" * 100

    def dst(server: Scripted, h: http.server.BaseHTTPRequestHandler, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        return 404, {}, b""

    with Scripted(src).running() as source, Scripted(dst).running() as dest:
        opts = RegistryOptions(insecure_hosts=frozenset({source.host, dest.host}))
        async with RegistrySession(opts) as s:
            with pytest.raises(ImageTooLargeError, match="image too large: its blobs declare 10737418340 bytes, over the maximum image size of 1048576 bytes"):
                await copy_image(reference.parse(f"{source.host}/r:1"), reference.parse(f"{dest.host}/r:1"), session=s,
                                 options=CopyOptions(max_image_size=1 << 20, attached=False))  # fmt: skip
    assert not [x for x in source.seen if "/blobs/" in x.path]
    assert not [x for x in dest.seen if x.method in ("POST", "PUT", "PATCH")]
    assert ImageTooLargeError("x").reason == "ImageTooLarge" and not ImageTooLargeError("x").temporary  # the Artifact's condition
