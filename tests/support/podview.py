"""HTTP requests made from a pod's point of view: run in a pod's (or node's) network namespace.

    results = from_netns("/run/netns/crnode-system-0", [{"url": "http://127.0.0.1:5050/v2/_catalog", "headers": {...}}])
    results[0]["status"], results[0]["www_authenticate"], results[0]["body"]

The caller (the test, on the host) builds the requests; this module, started with
``nsenter --net=NETNS python -m tests.support.podview``, sends them in order and prints one
JSON list of results. Only the network namespace changes, so host paths (a CA file) still resolve.
TLS is verified against CA_FILE (the chain only: the pod dials an IP, as a node dials the Service's).
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


def send(requests: list[dict[str, Any]], ca_file: str | None) -> list[dict[str, Any]]:
    context = None
    if ca_file:
        context = ssl.create_default_context(cafile=ca_file)
        context.check_hostname = False
    out = []
    for req in requests:
        u = urllib.parse.urlsplit(req["url"])
        host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
        conn = (http.client.HTTPSConnection(host, port, context=context, timeout=30) if u.scheme == "https"
                else http.client.HTTPConnection(host, port, timeout=30))
        try:
            conn.request(req.get("method", "GET"), u.path + (f"?{u.query}" if u.query else ""), headers=req.get("headers", {}))
            resp = conn.getresponse()
            body = resp.read()
            out.append({"status": resp.status, "www_authenticate": resp.getheader("WWW-Authenticate", ""),
                        "digest": resp.getheader("Docker-Content-Digest", ""), "body": body[:4096].decode(errors="replace")})
        except (OSError, ssl.SSLError) as err:
            out.append({"status": 0, "error": f"{type(err).__name__}: {err}"})
        finally:
            conn.close()
    return out


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
