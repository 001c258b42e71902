"""Generated files are not stale, and every value is documented (comment plus example) and in the schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.chart.chartlib import CHART, ROOT


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run([str(ROOT / "ci" / "generate"), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"run `make generate`:\n{result.stdout}{result.stderr}"
    assert (ROOT / "values.schema.json").read_bytes() == (CHART / "values.schema.json").read_bytes()


def _leaves(tree: Any, path: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    return [path]


def _documented() -> dict[str, str]:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("ci_generate", str(ROOT / "ci" / "generate"))
    spec = importlib.util.spec_from_loader("ci_generate", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return dict(module.documented_values((CHART / "values.yaml").read_text()))


def test_every_value_is_documented_with_an_example() -> None:
    docs = _documented()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for leaf in _leaves(values):
        owners = [k for k in docs if leaf == k or leaf.startswith(k + ".")]
        assert owners, f"{leaf} has no `# --` description in values.yaml (nor has any parent)"
    for key, text in docs.items():
        assert "Example:" in text and len(text.split("Example:")[0].strip()) > 10, f"{key}: description and example"


def test_schema_covers_every_value_and_only_those() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node or "allOf" in node:
            ref = node["$ref"] if "$ref" in node else node["allOf"][0]["$ref"]
            node = schema["definitions"][ref.split("/")[-1]]
        return node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            if path != ".global":  # Helm globals are shared with parent charts; everything below is closed
                assert node.get("additionalProperties") is False, f"{path}: the schema must be closed"
            assert set(value) <= set(node["properties"]), f"{path}: {set(value) - set(node['properties'])} not in the schema"
            for key, child in value.items():
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    nfe = schema["properties"]["global"]["properties"]["networkfunctionextension"]
    assert set(nfe["properties"]) == set(values["global"]["networkfunctionextension"])
    readme = (CHART / "README.md").read_text()
    assert "| `global.networkfunctionextension.clusterRegistry.clusterRegistryGCThreshold` | int | `0` |" in readme
