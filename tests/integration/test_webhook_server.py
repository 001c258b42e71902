"""The real webhook server over TLS on loopback: the CLI process, rotation, 400s, metrics, readiness,
and the attacks of #16 (a forged review, memory-hungry bodies, slow clients)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from cluster_registry.certs import pki
from cluster_registry.webhook.mutate import Mutator, Settings
from cluster_registry.webhook.pods import Owner, PodWatch
from cluster_registry.webhook.recorder import Recorder, Recording
from cluster_registry.certs.serving import TlsFiles
from cluster_registry.webhook.server import Limits, Webhook, start
from cluster_registry.webhook.view import ArtifactView

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "unit" / "fixtures" / "admission"
LOCAL = "cr.local:5000"


def write_pair(directory: Path, ca: tuple[bytes, bytes], now: dt.datetime | None = None) -> int:
    """Write tls.crt/tls.key signed by ``ca`` atomically (rename, as a Secret volume does); return the serial."""
    crt, key = pki.new_serving(ca[0], ca[1], ["localhost"], now or dt.datetime.now(dt.timezone.utc), ip_addresses=["127.0.0.1"])
    for name, data in (("tls.key", key), ("tls.crt", crt)):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)
    return int(x509.load_pem_x509_certificate(crt).serial_number)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_ssl(ca_pem: bytes, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def peer_serial(port: int, ca_pem: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_ssl(ca_pem).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


class Proc:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, tmp: Path, ca: tuple[bytes, bytes]) -> None:
        self.proc, self.port, self.tmp, self.ca = proc, port, tmp, ca
        self.url = f"https://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("webhook")
    ca = pki.new_ca(dt.datetime.now(dt.timezone.utc))
    write_pair(tmp, ca)
    port = free_port()
    log = open(tmp / "webhook.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster_registry", "--log-format", "json", "webhook", "--offline",
         "--rewrite-policy", "Always", "--tls-reload-interval", "0.2"],
        env={**os.environ, "CLUSTER_REGISTRY_WEBHOOK_LISTEN": f"127.0.0.1:{port}",
             "CLUSTER_REGISTRY_WEBHOOK_TLS_CERT": str(tmp / "tls.crt"),
             "CLUSTER_REGISTRY_WEBHOOK_TLS_KEY": str(tmp / "tls.key"),
             "CLUSTER_REGISTRY_WEBHOOK_REGISTRY_HOST": LOCAL},
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            peer_serial(port, ca[0])
            break
        except OSError:
            assert proc.poll() is None, (tmp / "webhook.log").read_text()
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("webhook did not start:\n" + (tmp / "webhook.log").read_text())
    yield Proc(proc, port, tmp, ca)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def review(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


async def test_mutate_over_tls(server: Proc) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(server.ca[0]))) as s:
        body = review("deployment_pod")
        async with s.post(f"{server.url}/mutate", json=body) as r:
            assert r.status == 200
            got = await r.json()
        assert got["response"]["uid"] == body["request"]["uid"] and got["response"]["allowed"] is True
        ops = json.loads(base64.b64decode(got["response"]["patch"]))
        assert {o["path"]: o["value"] for o in ops}["/spec/containers/1/image"] == f"{LOCAL}/docker.io/library/nginx:latest"
        for path in ("/healthz", "/readyz"):
            async with s.get(server.url + path) as r:
                assert r.status == 200, path


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe", b"[]", b'{"kind": "Pod"}', b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}',
     b"[" * 50_000, b'{"kind":"AdmissionReview","apiVersion":{"a":1},"request":{"uid":"u"}}'],
)
async def test_garbage_gets_400(server: Proc, payload: bytes) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(server.ca[0]))) as s:
        async with s.post(f"{server.url}/mutate", data=payload, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not an AdmissionReview" in (await r.json())["error"]


async def test_metrics_count_requests_rewrites_and_skips(server: Proc) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(server.ca[0]))) as s:
        for name in ("deployment_pod", "opt_out", "already_rewritten"):
            async with s.post(f"{server.url}/mutate", json=review(name)) as r:
                assert r.status == 200
        async with s.post(f"{server.url}/mutate", data=b"{") as r:
            assert r.status == 400
        async with s.get(f"{server.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['cluster_registry_webhook_requests_total{result="patched"}'] >= 1
    assert values['cluster_registry_webhook_requests_total{result="bad_request"}'] >= 1
    assert values["cluster_registry_webhook_rewrites_total"] >= 4
    assert values['cluster_registry_webhook_skips_total{reason="opt-out"}'] >= 1
    assert values['cluster_registry_webhook_skips_total{reason="local"}'] >= 2
    assert values["cluster_registry_webhook_request_duration_seconds_count"] >= 3


def test_tls_versions(server: Proc, tmp_path: Path) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_ssl(server.ca[0], minimum_version=version, maximum_version=version)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    # older versions: this OpenSSL's clients refuse them too, so check the server's own floor
    write_pair(tmp_path, server.ca)
    files = TlsFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    assert files.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_certificate_rotation_without_restart(server: Proc) -> None:
    before = peer_serial(server.port, server.ca[0])
    new = write_pair(server.tmp, server.ca)
    assert new != before
    deadline = time.monotonic() + 10
    while peer_serial(server.port, server.ca[0]) != new:
        assert time.monotonic() < deadline, "new certificate not served"
        time.sleep(0.1)
    # a broken pair is not loaded: the last good certificate keeps being served
    (server.tmp / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    time.sleep(0.8)
    assert peer_serial(server.port, server.ca[0]) == new
    assert server.proc.poll() is None
    write_pair(server.tmp, server.ca)
    # a rotation to a new CA is served too (clients trusting only the old CA now fail)
    other_ca = pki.new_ca(dt.datetime.now(dt.timezone.utc))
    rotated = write_pair(server.tmp, other_ca)
    deadline = time.monotonic() + 10
    while True:
        try:
            if peer_serial(server.port, other_ca[0]) == rotated:
                break
        except ssl.SSLError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(ssl.SSLError):
        peer_serial(server.port, server.ca[0])
    write_pair(server.tmp, server.ca)  # leave the module's server on its CA
    deadline = time.monotonic() + 10
    while True:
        try:
            peer_serial(server.port, server.ca[0])
            break
        except ssl.SSLError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


async def test_readyz_waits_for_the_artifact_view(tmp_path: Path) -> None:
    ca = pki.new_ca(dt.datetime.now(dt.timezone.utc))
    write_pair(tmp_path, ca)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    class SlowKube:
        """What the shared Informer calls: a list that waits for the test, then empty watches."""

        def list(self, plural: str, label_selector: str | None, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(20)
            return [], "1"

        def watch(self, plural: str, rv: str, selector: str | None, timeout: int, stopper: Any, namespace: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
            time.sleep(0.2)
            return iter(())

    view = ArtifactView(SlowKube())  # type: ignore[arg-type]
    hook = Webhook(Mutator(Settings.build(LOCAL)), view, TlsFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")), CollectorRegistry())
    running = await start(hook, "127.0.0.1", 0)
    try:
        url = f"https://127.0.0.1:{running.port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(ca[0]))) as s:
            async with s.get(url + "/readyz") as r:
                assert r.status == 503 and "not synced" in await r.text()
            async with s.post(url + "/mutate", json=review("job_pod")) as r:  # serving meanwhile
                assert r.status == 200 and (await r.json())["response"]["allowed"] is True
            release.set()
            for _ in range(100):
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 200
    finally:
        view.stop()
        await running.stop(drain=0.1)


def test_generated_reviews_through_the_real_server(server: Proc) -> None:
    """A smaller batch of the property test's reviews, over HTTPS with keep-alive: no 5xx, valid answers."""
    import http.client

    from hypothesis import HealthCheck, given, settings

    from tests.unit.test_webhook_property import check_response, reviews

    always = Mutator(Settings.build(LOCAL, "Always"))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_ssl(server.ca[0]), timeout=10)
    seen = {"n": 0}

    @settings(max_examples=int(os.environ.get("WEBHOOK_FUZZ_SERVER_EXAMPLES", "300")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(reviews())
    def run(body: dict[str, Any]) -> None:
        conn.request("POST", "/mutate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200, data
        got = json.loads(data)
        check_response(body, got)
        # the server runs --rewrite-policy Always with no exclusions: it answers as the pure core does
        assert got == always.review(body, ArtifactView(None)).review
        seen["n"] += 1

    try:
        run()
    finally:
        conn.close()
    assert seen["n"] >= 100


def test_arbitrary_json_never_gets_a_5xx(server: Proc) -> None:
    """Any JSON, including AdmissionReview envelopes around junk: 200 (allowed, uid echoed) or 400, never 5xx."""
    import http.client

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )
    envelopes = st.builds(
        lambda req, uid: {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {**req, "uid": uid}},
        st.fixed_dictionaries({}, optional={
            "operation": st.sampled_from(["CREATE", "UPDATE"]) | json_values,
            "resource": st.just({"resource": "pods", "group": ""}) | json_values,
            "subResource": st.just("ephemeralcontainers") | json_values,
            "object": st.fixed_dictionaries({}, optional={"metadata": json_values, "spec": json_values}) | json_values,
            "oldObject": json_values, "namespace": json_values, "dryRun": json_values,
        }),
        st.text(min_size=1, max_size=10),
    )  # fmt: skip
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_ssl(server.ca[0]), timeout=10)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(json_values | envelopes)
    def run(body: Any) -> None:
        conn.request("POST", "/mutate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read())
        assert r.status in (200, 400), data
        if r.status == 200:
            assert data["response"]["uid"] == body["request"]["uid"] and data["response"]["allowed"] is True

    try:
        run()
    finally:
        conn.close()


# -- #16: nobody can make the webhook write, or run it out of memory or connections


class RecordingApi:
    """An API server that records every call the recorder makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def get_artifact(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", namespace))
        return None

    def create_artifact(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", namespace))
        return body

    def patch_artifact(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", namespace))
        return patch

    def controller_of(self, namespace: str, owner: Owner) -> Owner | None:
        self.calls.append(("owner", namespace))
        return None

    def service_account_secrets(self, namespace: str, name: str) -> list[str]:
        self.calls.append(("sa", namespace))
        return ["victim-pull"]


async def in_process(tmp_path: Path, limits: Limits = Limits()) -> tuple[Any, Webhook, RecordingApi, bytes]:
    ca = pki.new_ca(dt.datetime.now(dt.timezone.utc))
    write_pair(tmp_path, ca)
    mutator = Mutator(Settings.build(LOCAL, "Always"))
    view = ArtifactView.static([])
    api = RecordingApi()
    recording = Recording(Recorder(api, view, batch_interval=0.02), PodWatch(None, mutator))
    hook = Webhook(mutator, view, TlsFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")), CollectorRegistry(),
                   recording=recording, limits=limits)  # fmt: skip
    return await start(hook, "127.0.0.1", 0), hook, api, ca[0]


async def test_a_forged_review_for_another_namespace_writes_nothing(tmp_path: Path) -> None:
    """Item 1 of #16: any TLS client may POST a review claiming any namespace and service account; it
    gets a patch and nothing else. Only a pod the API server holds (the pod watch's event) is recorded."""
    running, hook, api, ca = await in_process(tmp_path)
    try:
        forged = review("deployment_pod")
        forged["request"]["namespace"] = forged["request"]["object"]["metadata"]["namespace"] = "victim"
        forged["request"]["object"]["spec"]["serviceAccountName"] = "default"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(ca))) as s:
            for _ in range(20):
                async with s.post(f"https://127.0.0.1:{running.port}/mutate", json=forged) as r:
                    assert r.status == 200 and "patch" in (await r.json())["response"]
        await asyncio.sleep(0.3)  # several recorder batch intervals
        assert api.calls == [] and hook.recording is not None and hook.recording.recorder.pending == 0
        # the same pod, once it exists, is recorded
        pod = {**forged["request"]["object"], "metadata": {**forged["request"]["object"]["metadata"], "uid": "u1", "name": "p"}}
        hook.recording.pods.record_unannotated = True
        hook.recording.pods.apply("ADDED", pod)
        await asyncio.sleep(0.05)  # the watch hands intents to the event loop
        assert await hook.recording.recorder.drained(5)
        assert ("create", "victim") in api.calls
    finally:
        await running.stop(drain=0.5)


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_worst_case_bodies_keep_memory_under_the_limit(server: Proc) -> None:
    """Item 2 of #16: 16 MiB of `[],[],...` once grew RSS by ~470 MiB. Now bodies over 4 MiB are refused
    unread, bodies with more arrays/objects than a pod can hold are refused before they are parsed (and
    before they are held whole), and only 4 are read and parsed at once: 20 concurrent worst cases of each
    kind keep the process's peak RSS under the chart's 256 Mi limit."""
    limit = 256 * 1024 * 1024
    nested = b"[" + b"[]," * ((Limits.max_body - 2) // 3 - 1) + b"[]]"  # just under the body limit
    parsable = b'{"a":[' + b"[]," * (Limits.max_structures - 10) + b'[]],"pad":"' + b"x" * (Limits.max_body // 2) + b'"}'
    oversized = b"[" + b"[]," * (6 * 1024 * 1024 // 3) + b"[]]"

    async def attack(body: bytes, chunked: bool) -> list[int]:
        conn = aiohttp.TCPConnector(ssl=client_ssl(server.ca[0]), limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def post() -> int:
                async def chunks() -> Any:
                    for i in range(0, len(body), 65536):
                        yield body[i : i + 65536]

                data: Any = chunks() if chunked else body  # chunked: no Content-Length to refuse up front
                async with s.post(server.url + "/mutate", data=data, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status
            return list(await asyncio.gather(*(post() for _ in range(20))))

    assert asyncio.run(attack(nested, False)) == [413] * 20  # too many structures: never parsed
    assert asyncio.run(attack(parsable, False)) == [400] * 20  # parsed, four at a time: not a review
    assert asyncio.run(attack(oversized, False)) == [413] * 20  # too large: refused by Content-Length
    assert asyncio.run(attack(oversized, True)) == [413] * 20  # too large: refused while reading
    assert peak_rss(server.proc.pid) < limit, peak_rss(server.proc.pid)
    got = post_json(server, review("job_pod"))  # and it still answers
    assert got["response"]["allowed"] is True and "patch" in got["response"]


def post_json(server: Proc, body: dict[str, Any]) -> dict[str, Any]:
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=client_ssl(server.ca[0]), timeout=10)
    try:
        conn.request("POST", "/mutate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        got: dict[str, Any] = json.loads(r.read())
        return got
    finally:
        conn.close()


def test_idle_connections_outlive_the_api_servers_own_idle_timeout() -> None:
    """#20: the API server keeps an idle connection to a webhook for 90 s (apimachinery's
    SetTransportDefaults: Go's http.DefaultTransport IdleConnTimeout). Were the webhook to close it
    first, a pod created just then gets EOF on that connection, which the API server does not retry."""
    assert Limits().idle_timeout > 90.0


async def test_slow_clients_are_cut_off(tmp_path: Path) -> None:
    """Item 2 of #16: a client that trickles its headers is disconnected after the header timeout, one
    that trickles its body gets 408 after the body timeout; neither holds a connection for ever."""
    running, _hook, _api, ca = await in_process(tmp_path, Limits(idle_timeout=1.0, body_timeout=1.0))
    try:
        ctx = client_ssl(ca)
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port, ssl=ctx, server_hostname="127.0.0.1")
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        await writer.drain()
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port, ssl=ctx, server_hostname="127.0.0.1")
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        writer.close()
    finally:
        await running.stop(drain=0.1)
