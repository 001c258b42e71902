"""HTTP requests made from a pod's point of view: run in a pod's (or node's) network namespace.

    results = from_netns("/run/netns/crnode-system-0", [{"url": "http://127.0.0.1:5050/v2/_catalog", "headers": {...}}])
    results[0]["status"], results[0]["www_authenticate"], results[0]["body"]

The caller (the test, on the host) builds the requests; this module, started with
``nsenter --net=NETNS python -m tests.support.podview``, sends them in order and prints one
JSON list of results. Only the network namespace changes, so host paths (a CA file) still resolve.
TLS is verified against CA_FILE (the chain only: the pod dials an IP, as a node dials the Service's).
A plain ``http://`` request to a non-loopback host that the server refuses as plain HTTP (the chart's
registry with registryTLS: Go's fixed 400, or the token service closing) is sent again over https, as a
pod configured for the TLS endpoint would (unverified without CA_FILE); ``"upgrade": False`` in a
request keeps what plain HTTP got (the attack tests).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _refused_as_plain(req: dict[str, Any], answer: dict[str, Any]) -> bool:
    u = urllib.parse.urlsplit(req["url"])
    if u.scheme != "http" or u.hostname in ("127.0.0.1", "localhost") or not req.get("upgrade", True):
        return False
    return (answer["status"] == 400 and "HTTPS server" in answer.get("body", "")) or (
        answer["status"] == 0 and ("RemoteDisconnected" in answer["error"] or "Reset" in answer["error"]))


def send(requests: list[dict[str, Any]], ca_file: str | None) -> list[dict[str, Any]]:
    context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl._create_unverified_context()  # noqa: S323
    context.check_hostname = False
    out = []
    for req in requests:
        answer = _send(req, context)
        if _refused_as_plain(req, answer):
            answer = _send({**req, "url": "https" + req["url"][4:]}, context)
        out.append(answer)
    return out


def _send(req: dict[str, Any], context: ssl.SSLContext) -> dict[str, Any]:
    u = urllib.parse.urlsplit(req["url"])
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    conn = (http.client.HTTPSConnection(host, port, context=context, timeout=30) if u.scheme == "https"
            else http.client.HTTPConnection(host, port, timeout=30))
    try:
        conn.request(req.get("method", "GET"), u.path + (f"?{u.query}" if u.query else ""), headers=req.get("headers", {}))
        resp = conn.getresponse()
        body = resp.read()
        return {"status": resp.status, "www_authenticate": resp.getheader("WWW-Authenticate", ""),
                "digest": resp.getheader("Docker-Content-Digest", ""), "body": body[:4096].decode(errors="replace")}
    except (OSError, ssl.SSLError) as err:
        return {"status": 0, "error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def from_netns(netns: str, requests: list[dict[str, Any]], ca_file: str | None = None) -> list[dict[str, Any]]:
    """Send REQUESTS from network namespace NETNS (a path: /run/netns/..., /proc/PID/ns/net); their results, in order."""
    proc = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-m", "tests.support.podview", ca_file or ""],
                          input=json.dumps(requests), capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"podview in {netns} failed: {proc.stderr[-2000:]}")
    return list(json.loads(proc.stdout))


def basic(creds: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}


def bearer_challenge(netns: str, endpoint: str) -> dict[str, str]:
    """The realm and service of the Bearer challenge the registry at ENDPOINT answers ``GET /v2/`` with."""
    answer = from_netns(netns, [{"url": f"http://{endpoint}/v2/"}])[0]
    assert answer["status"] == 401 and answer["www_authenticate"].startswith("Bearer "), answer
    return {k.strip(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in answer["www_authenticate"][7:].split(","))}


def tokens(netns: str, challenge: dict[str, str], asks: list[tuple[str, tuple[str, str] | None]]) -> list[str | None]:
    """One token per (scope, credential), asked for as a runtime does (basic credentials at the realm);
    None where the realm refused."""
    reqs = [{"url": f"{challenge['realm']}?{urllib.parse.urlencode({'service': challenge['service'], 'scope': scope})}",
             "headers": basic(creds) if creds else {}} for scope, creds in asks]
    return [json.loads(r["body"])["token"] if r["status"] == 200 else None for r in from_netns(netns, reqs)]


if __name__ == "__main__":
    print(json.dumps(send(json.load(sys.stdin), sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)))
