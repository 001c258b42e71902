"""The webhook's NetworkPolicy (#16 item 4): with `networkPolicy.apiServerCIDRs` only the control
plane's ranges (and the monitoring namespaces, for metrics) reach the webhook; without, its port."""

from __future__ import annotations

from typing import Any

from tests.chart.chartlib import render, render_error

NAME = "t-cluster-registry-webhook"


def policy(*sets: str) -> dict[str, Any]:
    docs = render("networkPolicy.enabled=true", *sets)
    found: dict[str, Any] = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == NAME)
    return found


def test_by_default_the_port_only() -> None:
    assert policy()["spec"]["ingress"] == [{"ports": [{"port": 8443, "protocol": "TCP"}]}]


def test_api_server_ranges_admit_only_them() -> None:
    spec = policy("networkPolicy.apiServerCIDRs={10.0.0.0/24,fd00:1::/64}",
                  "networkPolicy.metricsNamespaceSelector.matchLabels.team=obs")["spec"]  # fmt: skip
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "webhook"
    assert spec["ingress"] == [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/24"}}, {"ipBlock": {"cidr": "fd00:1::/64"}}],
         "ports": [{"port": 8443, "protocol": "TCP"}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}], "ports": [{"port": 8443, "protocol": "TCP"}]},
    ]  # fmt: skip


def test_a_range_that_is_not_a_cidr_is_refused() -> None:
    assert "apiServerCIDRs" in render_error("networkPolicy.enabled=true", "networkPolicy.apiServerCIDRs={kube-apiserver}")
