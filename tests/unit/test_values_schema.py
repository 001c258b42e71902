"""install/schema: helm's coalescing of values and its wording for schema violations."""

from __future__ import annotations

from cluster_registry.install import schema as S

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["size", "mode"],
    "properties": {
        "size": {"type": "string", "pattern": "^[0-9]+Gi$"},
        "mode": {"enum": ["small", "large"]},
        "percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "nested": {"type": "object", "properties": {"on": {"type": "boolean"}}},
    },
}


def test_coalesce_merges_maps_and_null_removes_a_default() -> None:
    defaults = {"a": {"x": 1, "y": 2}, "b": 3, "c": [1]}
    assert S.coalesce(defaults, {"a": {"y": 5}, "b": None, "c": [2]}) == {"a": {"x": 1, "y": 5}, "c": [2]}
    assert defaults == {"a": {"x": 1, "y": 2}, "b": 3, "c": [1]}, "the defaults are not changed"


def test_messages_in_helms_words_sorted_by_path() -> None:
    got = S.errors({"size": "100GB", "mode": "huge", "percent": 101, "nested": {"on": "yes"}, "typo": 1}, SCHEMA)
    assert got == [
        "- at '': additional properties 'typo' not allowed",
        "- at '/mode': value must be one of 'small', 'large'",
        "- at '/nested/on': got string, want boolean",
        "- at '/percent': maximum: got 101, want 100",
        "- at '/size': '100GB' does not match pattern '^[0-9]+Gi$'",
    ]
    assert S.errors({"mode": "small"}, SCHEMA) == ["- at '': missing property 'size'"]
    assert S.errors({"size": "1Gi", "mode": "large"}, SCHEMA) == []
