#!/usr/bin/env python3
"""Offline JSON schemas for kubeconform, from Kubernetes' OpenAPI (v2 swagger.json) and from CRDs.

Layout (kubeconform `-schema-location 'DIR/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'`):
``DIR/<group>/<kind>_<version>.json``, ``<kind>`` lower case; for the core group kubeconform's ``.Group``
is the version itself, so core kinds live in ``DIR/v1/``.
Every schema is self-contained (only the definitions it reaches are embedded) and strict: objects
with declared properties get ``additionalProperties: false``, as kubeconform's ``-strict`` expects.

    openapi2jsonschema.py k8s SWAGGER_JSON OUT_DIR     # every kind in the Kubernetes API
    openapi2jsonschema.py crd CRD_YAML... OUT_DIR      # the served versions of CRDs (YAML, multi-doc)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
QUANTITY = {"anyOf": [{"type": "number"}, {"type": "string"}]}


def _strict(node: Any) -> Any:
    """Copy of an OpenAPI schema node made strict and plain JSON-schema."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        out = copy.deepcopy(INT_OR_STRING)
        if "description" in node:
            out["description"] = node["description"]
        return out
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(v) for v in value]
        elif key == "$ref":
            out[key] = value
        elif key.startswith("x-kubernetes-") or key in ("nullable", "x-kubernetes-embedded-resource"):
            continue
        else:
            out[key] = value
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref.split("/")[-1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def _write(out_dir: Path, group: str, kind: str, version: str, schema: dict[str, Any]) -> Path:
    path = out_dir / (group or version) / f"{kind.lower()}_{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    return path


def from_swagger(swagger: dict[str, Any], out_dir: Path) -> int:
    definitions = {name: _strict(d) for name, d in swagger["definitions"].items()}
    # Quantity and IntOrString are strings in the spec; manifests write numbers too.
    for name in definitions:
        if name.endswith("api.resource.Quantity"):
            definitions[name] = {**QUANTITY, "description": definitions[name].get("description", "")}
        elif name.endswith("util.intstr.IntOrString"):
            definitions[name] = copy.deepcopy(INT_OR_STRING)
    count = 0
    for name, definition in swagger["definitions"].items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if not definitions[name].get("properties", {}).get("kind"):
                continue  # list/option types without a kind of their own
            reached: set[str] = set()
            todo = [name]
            while todo:
                current = todo.pop()
                if current in reached:
                    continue
                reached.add(current)
                found: set[str] = set()
                _refs(definitions[current], found)
                todo.extend(found - reached)
            schema = copy.deepcopy(definitions[name])
            schema["definitions"] = {n: definitions[n] for n in sorted(reached)}
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            _write(out_dir, gvk["group"], gvk["kind"], gvk["version"], schema)
            count += 1
    return count


def crd_schemas(crd: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(group, kind, version, schema) for each served version of a CRD."""
    spec = crd["spec"]
    result = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = _strict(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{spec['group']}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
        props["metadata"] = {"type": "object"}
        schema["additionalProperties"] = False
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        result.append((spec["group"], spec["names"]["kind"], version["name"], schema))
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[1] == "k8s":
        count = from_swagger(json.loads(Path(argv[2]).read_text()), Path(argv[3]))
        print(f"{count} schemas in {argv[3]}")
        return 0
    if len(argv) >= 4 and argv[1] == "crd":
        import yaml  # only this mode needs PyYAML

        out_dir = Path(argv[-1])
        for path in argv[2:-1]:
            for doc in yaml.safe_load_all(Path(path).read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    for group, kind, version, schema in crd_schemas(doc):
                        print(_write(out_dir, group, kind, version, schema))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
