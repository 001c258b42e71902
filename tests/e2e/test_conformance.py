"""Issue 15: the OCI distribution-spec conformance suite against the registry endpoint as the chart deploys it.

The suite (`.cache/bin/oci-conformance`, ci/conformance) runs every workflow (pull, push, content
discovery, content management) twice in one registry pod of a real install: through the pod's
registry port (the endpoint the Service leads to, with its auth and TLS, using a push-capable
credential) and against distribution directly (the chart's config and storage, no front:
tests/support/inpod.py). Distribution itself fails some checks (3.0.0 has no referrers API and no
sha512 digests), so the assertion is relative: the endpoint passes every check distribution passes.
The totals of both runs are printed and recorded as junit properties, so a change of registry
version or front shows up in the numbers.
"""

from __future__ import annotations

import collections
import os
import secrets
import socket
import ssl
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import cnf
from tests.support.cluster import BIN, Cluster, component_pods, exclusive_chart, pod_ready, wait_for
from tests.support.inpod import direct_distribution, port_forward, push_credential, service_port, single_replica_values

SUITE = BIN / "oci-conformance"
WORKFLOWS = {  # pull, push, content discovery (tags, referrers), content management (deletes)
    "OCI_API_PULL": "true", "OCI_API_PUSH": "true", "OCI_API_TAGS_LIST": "true", "OCI_API_REFERRER": "true",
    "OCI_API_BLOBS_DELETE": "true", "OCI_API_MANIFESTS_DELETE": "true", "OCI_API_TAGS_DELETE": "true",
}

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="run ci/toolchain: it builds .cache/bin/oci-conformance")


def speaks_tls(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw):
            return True
    except (ssl.SSLError, ConnectionResetError):
        return False


def run_suite(out: Path, port: int, repo: str, auth: tuple[str, str] | None = None) -> dict[str, collections.Counter[str]]:
    """Run the suite against 127.0.0.1:PORT; {status: Counter of test names} from its junit report."""
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCI_")}
    env.update(WORKFLOWS, OCI_REGISTRY=f"127.0.0.1:{port}", OCI_TLS="insecure" if speaks_tls(port) else "disabled",
               OCI_REPO1=f"conformance/{repo}-1", OCI_REPO2=f"conformance/{repo}-2", OCI_RESULTS_DIR=str(out / "results"),
               OCI_USERNAME=auth[0] if auth else "", OCI_PASSWORD=auth[1] if auth else "")
    # cwd: the suite would read an oci-conformance.yaml found there
    proc = subprocess.run([str(SUITE)], cwd=out, env=env, capture_output=True, text=True, timeout=600)
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    junit = out / "results" / "junit.xml"
    assert junit.exists(), f"the suite wrote no report (exit {proc.returncode}): {proc.stderr[-2000:]}"
    by_status: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for case in ET.parse(junit).getroot().iter("testcase"):
        by_status[case.get("status", "")][case.get("name", "")] += 1
    return by_status


def totals(result: dict[str, collections.Counter[str]]) -> dict[str, int]:
    return {status: sum(names.values()) for status, names in sorted(result.items())}


@pytest.fixture(scope="module")
def registry_pod(cluster: Cluster) -> Iterator[tuple[str, str, dict[str, Any]]]:
    release, ns = f"oc{secrets.token_hex(2)}", f"e2e-conformance-{secrets.token_hex(3)}"
    with exclusive_chart():
        cluster.kubectl("create", "namespace", ns)
        try:
            cnf.install_cluster_registry(cluster, release, ns, single_replica_values())
            pod = wait_for(lambda: next((p for p in component_pods(cluster, ns, "registry") if pod_ready(p)), None),
                           timeout=120, what="a Ready registry pod")
            yield release, ns, pod
        finally:
            cluster.helm("uninstall", release, "-n", ns, "--wait", "--timeout", "120s", check=False)
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_endpoint_passes_every_conformance_check_distribution_passes(
        cluster: Cluster, registry_pod: tuple[str, str, dict[str, Any]], tmp_path: Path,
        record_property: Callable[[str, object], None]) -> None:
    release, ns, pod = registry_pod
    endpoint_port = service_port(pod)
    with direct_distribution(cluster, ns, pod) as direct_port, \
            port_forward(cluster, ns, pod["metadata"]["name"], endpoint_port, direct_port) as local:  # fmt: skip
        endpoint = run_suite(tmp_path / "endpoint", local[endpoint_port], "endpoint",
                             push_credential(cluster, ns, release))
        direct = run_suite(tmp_path / "direct", local[direct_port], "direct")
    figures = {"endpoint": totals(endpoint), "direct": totals(direct)}
    print(f"\nconformance totals: {figures}")
    record_property("conformance", figures)
    # The suite really ran every workflow: distribution passes most of it, pushes and deletes included.
    assert figures["direct"].get("passed", 0) > 500, figures
    assert {n for n in direct["passed"] if "/blob-delete" in n or "/manifest-delete" in n}, "no delete check passed"
    missing = direct["passed"] - endpoint["passed"]
    assert not missing, f"checks distribution passes but the endpoint fails: {sorted(missing)[:40]} (see {tmp_path})"
