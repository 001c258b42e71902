"""A small, strict RFC 6902 applier (add, remove, replace, test) for checking the webhook's patches in tests.
Strict means an operation on a path that does not exist raises ``ValueError``, as the API server's
applier would; the input document is not modified.
"""

from __future__ import annotations

import copy
from typing import Any


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool = False) -> int:
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise ValueError(f"bad array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not for_add):
        raise ValueError(f"array index {i} out of range")
    return i


def apply(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """Apply ``patch`` to a copy of ``doc`` and return it; raise ValueError when it does not apply."""
    if not isinstance(patch, list):
        raise ValueError("a JSON Patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in patch:
        if not isinstance(op, dict) or "path" not in op or not isinstance(op["path"], str):
            raise ValueError(f"bad operation {op!r}")
        kind = op.get("op")
        tokens = _tokens(op["path"])
        if not tokens:
            raise ValueError("operations on the whole document are not supported")
        parent: Any = doc
        for t in tokens[:-1]:
            if isinstance(parent, dict):
                if t not in parent:
                    raise ValueError(f"path {op['path']!r} does not exist")
                parent = parent[t]
            elif isinstance(parent, list):
                parent = parent[_index(parent, t)]
            else:
                raise ValueError(f"path {op['path']!r} goes through a scalar")
        last = tokens[-1]
        if kind in ("replace", "test", "remove"):
            if isinstance(parent, dict):
                if last not in parent:
                    raise ValueError(f"path {op['path']!r} does not exist")
                key: Any = last
            elif isinstance(parent, list):
                key = _index(parent, last)
            else:
                raise ValueError(f"path {op['path']!r} goes through a scalar")
            if kind == "replace":
                if "value" not in op:
                    raise ValueError("replace without a value")
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "test":
                if parent[key] != op.get("value"):
                    raise ValueError(f"test failed at {op['path']!r}")
            else:
                del parent[key]
        elif kind == "add":
            if "value" not in op:
                raise ValueError("add without a value")
            if isinstance(parent, dict):
                parent[last] = copy.deepcopy(op["value"])
            elif isinstance(parent, list):
                parent.insert(_index(parent, last, for_add=True), copy.deepcopy(op["value"]))
            else:
                raise ValueError(f"path {op['path']!r} goes through a scalar")
        else:
            raise ValueError(f"unsupported operation {kind!r}")
    return doc
