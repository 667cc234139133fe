"""Structured-output `response_format` for a msgspec Struct, in the shape OpenAI's strict mode accepts.

Every LLM stage asks for JSON that the engine then parses into a msgspec Struct (`engine.chat_json`). The schema
sent to the provider is derived from that same Struct, so the two cannot drift apart. `msgspec.json.schema`
is close to what strict mode wants but not equal to it; `strict_schema` closes the gap:

- `$ref`s are inlined (no `$defs`), because some OpenAI-compatible servers do not resolve references;
- every object gets `additionalProperties: false` and lists all of its properties in `required` (strict mode
  has no optional fields; a field with a default in the Struct must still be answered, which msgspec accepts);
- `default` and `title` keywords are dropped (strict mode rejects `default`; `title` is noise), and so are
  object-level `description`s, which msgspec takes from class docstrings written for developers, not models.

A Struct containing a free-form mapping (`dict[str, ...]`), `Any`, or a recursive reference cannot be expressed
in strict mode; asking for one raises `TypeError` naming the offending path.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

__all__ = ["response_format_for", "strict_schema"]

_DROPPED_KEYWORDS = ("default", "title")


def strict_schema(struct_type: type) -> dict[str, Any]:
    """The strict-mode JSON schema of `struct_type` (a msgspec Struct), self-contained (no `$ref`)."""
    if not (isinstance(struct_type, type) and issubclass(struct_type, msgspec.Struct)):
        raise TypeError(f"structured output needs a msgspec Struct type, not {struct_type!r}: strict mode wants "
                        "a JSON object at the root")
    raw = msgspec.json.schema(struct_type)
    defs = raw.get("$defs", {})
    return _rewrite(raw, defs, path="$", resolving=())


@functools.cache
def response_format_for(struct_type: type, name: str) -> dict[str, Any]:
    """`{"type": "json_schema", "json_schema": {"name", "strict": true, "schema"}}` for `struct_type`.

    The result is cached per (type, name) and shared between callers: treat it as read-only.
    """
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "strict": True, "schema": strict_schema(struct_type)},
    }


def _rewrite(node: Any, defs: dict[str, Any], *, path: str, resolving: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_rewrite(item, defs, path=f"{path}[{i}]", resolving=resolving) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"]
        target = ref.rsplit("/", 1)[-1]
        if target in resolving:
            raise TypeError(f"{path}: recursive type {target!r} cannot be inlined for strict mode")
        if target not in defs:
            raise TypeError(f"{path}: unresolved reference {ref!r}")
        return _rewrite(defs[target], defs, path=path, resolving=resolving + (target,))
    if not node:
        raise TypeError(f"{path}: an unconstrained value (Any) is not allowed in strict mode")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {
                prop: _rewrite(sub, defs, path=f"{path}.{prop}", resolving=resolving) for prop, sub in value.items()
            }
        else:
            out[key] = _rewrite(value, defs, path=path, resolving=resolving)
    if out.get("type") == "object":
        if "properties" not in out:
            raise TypeError(f"{path}: a free-form mapping is not allowed in strict mode")
        out.pop("description", None)
        out["additionalProperties"] = False
        out["required"] = list(out["properties"])
    return out
