"""A values file checked against the chart's ``values.schema.json`` as helm checks it, before helm runs.

Pure but for :func:`load_chart`. Helm coalesces the user's values over the chart's ``values.yaml``
(maps merge, a ``null`` deletes a default) and validates the result; the messages follow helm 3.19's
(``- at '/json/pointer': got string, want boolean``) so CI and GitOps repositories see what
``helm install`` would say.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cluster_registry.errors import ConfigError


@dataclass(frozen=True)
class Chart:
    name: str
    defaults: dict[str, Any]
    schema: dict[str, Any]


def load_chart(chart_dir: str | Path) -> Chart:
    """The chart's name, default values and values schema."""
    root = Path(chart_dir)
    try:
        meta = yaml.safe_load((root / "Chart.yaml").read_text()) or {}
        defaults = yaml.safe_load((root / "values.yaml").read_text()) or {}
        schema = json.loads((root / "values.schema.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the chart at {root}: {err}") from err
    return Chart(str(meta.get("name") or root.name), defaults, schema)


def coalesce(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``defaults`` as helm merges values: maps recursively, a ``null`` removes the key."""
    out = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = value
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"  # helm reads every YAML number as a float: a type error says "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _quoted(value: Any) -> str:
    """A value as helm quotes it: strings JSON-escaped in single quotes, the rest as JSON."""
    return f"'{json.dumps(value)[1:-1]}'" if isinstance(value, str) else json.dumps(value)


def _message(err: jsonschema.ValidationError) -> str:
    """helm's (santhosh-tekuri/jsonschema v6) wording for one failed keyword."""
    kind, schema = err.validator, err.schema
    want: Any = err.validator_value
    got: Any = err.instance
    assert isinstance(schema, Mapping)
    if kind == "type":
        wanted = " or ".join(want) if isinstance(want, list) else want
        return f"got {_json_type(got)}, want {wanted}"
    if kind == "enum":
        return "value must be one of " + ", ".join(_quoted(v) for v in want)
    if kind == "const":
        return f"value must be {_quoted(want)}"
    if kind == "pattern":
        return f"{_quoted(got)} does not match pattern {_quoted(want)}"
    if kind == "required":
        missing = [p for p in want if isinstance(got, dict) and p not in got]
        names = ", ".join(_quoted(p) for p in missing)
        return f"missing property {names}" if len(missing) == 1 else f"missing properties {names}"
    if kind == "additionalProperties":
        allowed = set(schema.get("properties") or {})
        extra = sorted(k for k in got if k not in allowed) if isinstance(got, dict) else []
        return f"additional properties {', '.join(_quoted(k) for k in extra)} not allowed"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems"):
        measured = len(got) if kind.endswith(("Length", "Items")) else got
        return f"{kind}: got {json.dumps(measured)}, want {json.dumps(want)}"
    return str(err.message)


def errors(values: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """One line per violation, ``- at '/path': message``, sorted by path as helm prints them; an
    ``anyOf``/``oneOf`` that failed is one line with its alternatives' failures indented under it."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    found = sorted(
        (_pointer(leaf), lines) for err in validator.iter_errors(values) for leaf, lines in _entries(err, "")
    )
    return [line for _, lines in found for line in lines]


def _pointer(err: jsonschema.ValidationError) -> str:
    return "".join(f"/{p}" for p in err.absolute_path)


def _entries(err: jsonschema.ValidationError, indent: str) -> list[tuple[jsonschema.ValidationError, list[str]]]:
    """allOf (and $ref) failures are reported as the keywords that failed inside them, as helm does."""
    if err.validator == "allOf" and err.context:
        return [entry for sub in err.context for entry in _entries(sub, indent)]
    head = f"{indent}- at '{_pointer(err)}': "
    if err.validator in ("anyOf", "oneOf") and err.context:
        subs = sorted(
            (_pointer(leaf), line) for sub in err.context for leaf, lines in _entries(sub, indent + "  ") for line in lines
        )
        return [(err, [f"{head}'{err.validator}' failed", *(line for _, line in subs)])]
    return [(err, [head + _message(err)])]


def report(chart: str, lines: list[str]) -> str:
    """helm's refusal: ``values don't meet the specifications of the schema(s) in the following chart(s):``."""
    return "\n".join(["values don't meet the specifications of the schema(s) in the following chart(s):", f"{chart}:", *lines])
