"""Pure conversions from Kubernetes objects to facts, the Status-body reader and the CLI surface
that needs no cluster (``--dry-run``, usage errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kubernetes.client import ApiException

from cluster_registry.cli import cli
from cluster_registry.install import validate as VA


def test_parse_version() -> None:
    assert VA.parse_version("1", "29+") == (1, 29)
    assert VA.parse_version("1", "31") == (1, 31)
    with pytest.raises(ValueError):
        VA.parse_version("", "")


def test_node_fact() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {"kubernetes.azure.com/mode": "system"}},
        "spec": {"taints": [{"key": "CriticalAddonsOnly", "value": "true", "effect": "NoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    fact = VA.node_fact(node)
    assert (fact.name, fact.ready, fact.schedulable) == ("n1", True, True)
    node["spec"] = {"unschedulable": True}
    assert not VA.node_fact(node).schedulable
    node["spec"] = {"taints": [{"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"}]}
    assert not VA.node_fact(node).schedulable
    node["status"] = {"conditions": [{"type": "Ready", "status": "Unknown"}]}
    assert not VA.node_fact(node).ready


def test_storage_class_and_volume_facts() -> None:
    sc = VA.storage_class_fact(
        {"metadata": {"name": "std", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}}, "provisioner": "p"}
    )
    assert (sc.name, sc.provisioner, sc.is_default) == ("std", "p", True)
    assert not VA.storage_class_fact({"metadata": {"name": "x"}, "provisioner": "p"}).is_default
    vol = VA.volume_fact(
        {
            "metadata": {"name": "r"},
            "spec": {"storageClassName": "std", "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}}},
        }
    )
    assert (vol.name, vol.storage_class, vol.requested, vol.access_modes) == ("r", "std", "100Gi", ("ReadWriteMany",))


def test_api_error_message_prefers_field_causes() -> None:
    err = ApiException(status=422, reason="Unprocessable Entity")
    err.body = json.dumps(
        {
            "message": "MutatingWebhookConfiguration is invalid: long text",
            "details": {"causes": [{"field": "webhooks[0].matchConditions[0].expression", "message": "Invalid value: compilation failed"}]},
        }
    )
    assert VA.api_error_message(err) == "webhooks[0].matchConditions[0].expression: Invalid value: compilation failed"
    err.body = "not json"
    assert VA.api_error_message(err) == "HTTP 422: Unprocessable Entity"


def test_the_dry_run_update_carries_the_expression_on_the_releases_configuration() -> None:
    current = {"metadata": {"name": "r-cluster-registry-webhook", "resourceVersion": "7"},
               "webhooks": [{"name": "pods.clusterregistry.io", "matchConditions": [{"name": "x", "expression": "false"}]}]}  # fmt: skip
    body = VA.with_expression(current, "true")
    assert body["webhooks"] == [{"name": "pods.clusterregistry.io", "matchConditions": [{"name": "values", "expression": "true"}]}]
    assert body["metadata"] == current["metadata"] and current["webhooks"][0]["matchConditions"][0]["name"] == "x"


def test_dry_run_lists_checks_without_a_cluster(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("enableClusterRegistry: true\n")
    result = CliRunner().invoke(cli, ["validate", "--values", str(values), "--dry-run", "--kubeconfig", "/nonexistent"])
    assert result.exit_code == 0, result.output
    for check in ("values", "ha-nodes", "storage-immutable", "match-condition", "kubernetes-version"):
        assert f"would check [{check}]" in result.output


def test_unreadable_values_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("a: [unclosed\n")
    result = CliRunner().invoke(cli, ["validate", "--values", str(bad)])
    assert result.exit_code == 2
    assert "cannot read values file" in result.output


def test_unreachable_cluster_exit_2(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("{}\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    result = CliRunner().invoke(cli, ["validate", "--values", str(values), "--kubeconfig", str(kubeconfig)])
    assert result.exit_code == 2, result.output
    assert "cannot read the cluster" in result.output


def test_render_text_summary() -> None:
    from cluster_registry.install import checks as C

    text = VA.render_text([C.Problem("gc-cadence", C.Severity.ERROR, "bad", "clusterRegistry.clusterRegistryGCCadence")])
    assert text.splitlines()[-1] == "validate: 1 problem(s), 0 warning(s): refusing this configuration"
    assert json.loads(VA.render_json([]))["ok"] is True
