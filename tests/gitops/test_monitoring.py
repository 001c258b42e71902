"""The chart's PrometheusRule and Grafana dashboard, checked with Prometheus's own `promtool`.

* every alert fires on the series that should trigger it (after its `for`), and stays silent just
  before and on healthy series (`promtool test rules`);
* every rule and every dashboard query parses (`promtool check rules`; the dashboard's queries are
  checked as recording rules, Grafana's variables substituted);
* the PrometheusRule validates against the Prometheus Operator's own CRD schema (kubeconform strict);
* the dashboard ConfigMap carries the Grafana sidecar's label and the JSON file unchanged.

tests/gitops/test_installed.py scrapes the running components for the metric names used here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.gitops.lib import CHART, ROOT, monitoring_crd, render, tool

NS, FULL = "crns", "cr-cluster-registry"
DASHBOARD = CHART / "files" / "cluster-registry-dashboard.json"
MONITORING = {"global": {"networkfunctionextension": {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "clusterRegistry": {"clusterRegistryGCThreshold": 80},
}}}
# Series other exporters provide, which a Prometheus Operator stack scrapes anyway.
EXTERNAL = {
    "kubelet_volume_stats_used_bytes": "kubelet",
    "kubelet_volume_stats_capacity_bytes": "kubelet",
    "kube_job_status_failed": "kube-state-metrics",
}


def kind(docs: list[dict[str, Any]], k: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == k]


def rule_groups(values: dict[str, Any] = MONITORING) -> list[dict[str, Any]]:
    (rule,) = kind(render(values), "PrometheusRule")
    return list(rule["spec"]["groups"])


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (every selector here has a label matcher)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def used_metric_names() -> set[str]:
    exprs = [r["expr"] for g in rule_groups() for r in g["rules"]] + dashboard_queries()
    return set().union(*map(metric_names, exprs))


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def s(name: str, **labels: str) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


PVC = {"namespace": NS, "persistentvolumeclaim": f"{FULL}-registry"}
WEBHOOK = {"namespace": NS, "service": f"{FULL}-webhook"}
ARTIFACTS = {"namespace": NS, "service": f"{FULL}-artifact-reconciler"}
REGISTRY = {"namespace": NS, "service": f"{FULL}-registry"}


def case(series: dict[str, str], alert: str, fires_at: str, silent_at: str, labels: dict[str, str] | None = None
         ) -> dict[str, Any]:
    """A promtool test: ALERT is silent at SILENT_AT and fires (with LABELS) at FIRES_AT."""
    fired = {"severity": "warning", **(labels or {})}
    return {
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": [
            {"eval_time": silent_at, "alertname": alert, "exp_alerts": []},
            {"eval_time": fires_at, "alertname": alert, "exp_alerts": [{"exp_labels": fired}]},
        ],
    }


def silent(series: dict[str, str], alert: str, at: str) -> dict[str, Any]:
    return {"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}]}


def webhook_series(errors_per_min: int, total_per_min: int, slow: bool) -> dict[str, str]:
    """Counters of the webhook's requests and latency histogram for 40 minutes."""
    bucket = "cluster_registry_webhook_request_duration_seconds_bucket"
    fast_le, slow_le = ("1.0", "2.5") if slow else ("0.01", "0.025")
    out = {
        s("cluster_registry_webhook_requests_total", **WEBHOOK, result="error"): f"0+{errors_per_min}x40",
        s("cluster_registry_webhook_requests_total", **WEBHOOK, result="patched"): f"0+{total_per_min - errors_per_min}x40",
    }
    for le in ("0.005", fast_le, slow_le, "+Inf"):
        count = 0 if le == "0.005" else total_per_min
        out[s(bucket, **WEBHOOK, le=le)] = f"0+{count}x40"
    return out


CASES = {
    "usage over GC threshold": case(
        {s("kubelet_volume_stats_used_bytes", **PVC): "85x1600", s("kubelet_volume_stats_capacity_bytes", **PVC): "100x1600"},
        "ClusterRegistryUsageOverGCThreshold", fires_at="25h2m", silent_at="24h58m", labels=PVC),
    "usage under GC threshold": silent(
        {s("kubelet_volume_stats_used_bytes", **PVC): "79x1600", s("kubelet_volume_stats_capacity_bytes", **PVC): "100x1600"},
        "ClusterRegistryUsageOverGCThreshold", at="26h"),
    "nearly full": case(
        {s("kubelet_volume_stats_used_bytes", **PVC): "95x30", s("kubelet_volume_stats_capacity_bytes", **PVC): "100x30"},
        "ClusterRegistryStorageNearlyFull", fires_at="11m", silent_at="9m", labels={**PVC, "severity": "critical"}),
    "GC window over its bound": case(
        {s("cluster_registry_gate_lock_held", **REGISTRY, pod="r1"): "1x20", s("cluster_registry_gate_lock_held", **REGISTRY, pod="r2"): "0x20"},
        "ClusterRegistryGCWindowTooLong", fires_at="11m", silent_at="9m", labels={"severity": "critical"}),
    "GC window within its bound": silent(
        {s("cluster_registry_gate_lock_held", **REGISTRY, pod="r1"): "1x5 0x20"}, "ClusterRegistryGCWindowTooLong", at="15m"),
    "GC failed": case(
        {s("kube_job_status_failed", namespace=NS, job_name=f"{FULL}-gc-29001440"): "0 0 1 1"},
        "ClusterRegistryGCFailed", fires_at="2m", silent_at="1m", labels={"job_name": f"{FULL}-gc-29001440"}),
    "another CronJob's Job failed": silent(
        {s("kube_job_status_failed", namespace=NS, job_name=f"{FULL}-gc-report-29001440"): "1x5"}, "ClusterRegistryGCFailed", at="4m"),
    "artifacts failing": case(
        {s("cluster_registry_artifacts", **ARTIFACTS, phase="Failed"): "2x30", s("cluster_registry_artifacts", **ARTIFACTS, phase="Ready"): "9x30"},
        "ClusterRegistryArtifactsFailing", fires_at="16m", silent_at="14m"),
    "queue growing": case(
        {s("cluster_registry_artifact_queue_depth", **ARTIFACTS): "40+1x60"},
        "ClusterRegistryArtifactQueueGrowing", fires_at="27m", silent_at="25m"),  # over 50 from 11m, `for: 15m`
    "queue long but draining": silent(
        {s("cluster_registry_artifact_queue_depth", **ARTIFACTS): "200-1x60"}, "ClusterRegistryArtifactQueueGrowing", at="50m"),
    # rate() needs two samples: pending from 1m, firing once `for: 10m` has passed
    "webhook errors": case(webhook_series(10, 100, slow=False), "ClusterRegistryWebhookErrors",
                           fires_at="12m", silent_at="10m", labels={"severity": "critical"}),
    "webhook few errors": silent(webhook_series(1, 100, slow=False), "ClusterRegistryWebhookErrors", at="30m"),
    "webhook slow": case(webhook_series(0, 100, slow=True), "ClusterRegistryWebhookSlow", fires_at="12m", silent_at="10m"),
    "webhook fast": silent(webhook_series(0, 100, slow=False), "ClusterRegistryWebhookSlow", at="30m"),
}


def write_rules(tmp_path: Path, groups: list[dict[str, Any]], annotations: bool = True) -> Path:
    if not annotations:  # promtool test compares annotations exactly; the templates are checked separately
        groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_rules_and_their_templates_pass_promtool_check(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_groups())
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout, result.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"]}
    tested = {t["alert_rule_test"][-1]["alertname"] for t in CASES.values()}
    assert alerts == tested


@pytest.mark.parametrize("name", CASES)
def test_alert_unit_tests_pass_promtool(tmp_path: Path, name: str) -> None:
    write_rules(tmp_path, rule_groups(), annotations=False)
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [CASES[name]]}))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_promtool_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """Negative control: the unit tests would catch an alert that did not fire."""
    write_rules(tmp_path, rule_groups(), annotations=False)
    wrong = json.loads(json.dumps(CASES["artifacts failing"]))
    wrong["input_series"][0]["values"] = "0x30"  # nothing Failed: the expected alert must be missing
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                        "tests": [wrong]}))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "ClusterRegistryArtifactsFailing" in result.stdout + result.stderr


def test_rules_follow_values() -> None:
    """No usage alerts without a volume, no threshold alert at threshold 0, no GC alert without GC."""
    def alerts(**nfe: Any) -> set[str]:
        values = json.loads(json.dumps(MONITORING))
        values["global"]["networkfunctionextension"]["clusterRegistry"].update(nfe)
        return {r["alert"] for g in rule_groups(values) for r in g["rules"]}

    everything = alerts()
    assert "ClusterRegistryUsageOverGCThreshold" not in alerts(clusterRegistryGCThreshold=0)
    assert "ClusterRegistryGCFailed" not in alerts(clusterRegistryGCCadence="")
    s3 = alerts(storage={"driver": "s3", "s3": {"bucket": "b", "region": "r"}})
    assert everything - s3 == {"ClusterRegistryUsageOverGCThreshold", "ClusterRegistryStorageNearlyFull"}
    off = render({"global": {"networkfunctionextension": {}}})
    assert not kind(off, "PrometheusRule") and not [d for d in kind(off, "ConfigMap") if "dashboard" in d["metadata"]["name"]]


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query{i}", "expr": q.replace("$__rate_interval", "5m").replace("$namespace", "crns")}
             for i, q in enumerate(dashboard_queries())]
    assert len(rules) >= 12
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # every query is scoped to the chosen namespace
    assert all('namespace="$namespace"' in q for q in dashboard_queries())


def test_dashboard_configmap_carries_the_sidecar_label_and_the_file() -> None:
    values = json.loads(json.dumps(MONITORING))
    values["global"]["networkfunctionextension"]["grafanaDashboard"]["namespace"] = "monitoring"
    (cm,) = [d for d in kind(render(values), "ConfigMap") if d["metadata"]["name"] == f"{FULL}-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["cluster-registry.json"]) == json.loads(DASHBOARD.read_text())


def test_metric_names_are_ours_or_named_exporters() -> None:
    names = used_metric_names()
    ours = {n for n in names if n.startswith(("cluster_registry_", "registry_"))}
    assert names - ours <= set(EXTERNAL), names - ours - set(EXTERNAL)
    assert len(ours) >= 12


def test_prometheusrule_and_servicemonitors_validate_against_the_operators_crds(tmp_path: Path) -> None:
    from tests.chart.test_lint import LOCATION

    schemas = tmp_path / "schemas"
    out = subprocess.run([sys.executable, str(ROOT / "schema" / "openapi2jsonschema.py"), "crd",
                          str(monitoring_crd("prometheusrules")), str(monitoring_crd("servicemonitors")), str(schemas)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in render(MONITORING) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in docs} == {"PrometheusRule", "ServiceMonitor"}
    manifests = tmp_path / "monitoring.yaml"
    manifests.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([tool("kubeconform"), "-strict", "-summary", "-schema-location",
                             f"{schemas}/{LOCATION}", str(manifests)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(docs)}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout
