"""The node proxy (chart/templates/nodeproxy): the registry on every node's 127.0.0.1, the default
rewrite target (docs/pull-path.md)."""

from __future__ import annotations

import pytest

from tests.chart.chartlib import NAMESPACE, RELEASE, all_of, find, pod_spec, render

pytestmark = pytest.mark.chart


def test_a_hostnetwork_daemonset_on_every_node_listens_on_loopback_only() -> None:
    ds = find(render("nodeProxy.port=5151"), "DaemonSet", "-node-proxy")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}], "every node may run a rewritten pod"
    assert spec["automountServiceAccountToken"] is False, "it needs no API access"
    assert spec["securityContext"]["runAsUser"] == 65532
    (c,) = spec["containers"]
    args = c["args"]
    assert args[0] == "node-proxy"
    assert args[args.index("--listen") + 1] == "127.0.0.1:5151"
    assert args[args.index("--upstream") + 1] == f"{RELEASE}-cluster-registry-registry.{NAMESPACE}.svc:5000"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["readinessProbe"]["tcpSocket"] == {"host": "127.0.0.1", "port": 5151}
    assert not c.get("ports"), "no hostPort: nothing off the node reaches it"
    assert spec["priorityClassName"] == "system-node-critical"


def test_no_node_proxy_when_disabled_or_without_the_registry() -> None:
    for sets in (("nodeProxy.enabled=false", "registryTLS.enabled=false"), ("enableClusterRegistry=false",)):
        assert not [d for d in all_of(render(*sets), "DaemonSet") if d["metadata"]["name"].endswith("-node-proxy")], sets
