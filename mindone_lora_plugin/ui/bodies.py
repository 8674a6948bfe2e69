"""The JSON bodies the UI's actions take: parsed and type-checked, so a malformed one is a 400 with one message.

A body is a JSON object; ``values`` (the form) maps names to strings, numbers, booleans or null; ``loras`` is a list
of ``{"path", "weight"}`` objects. Anything else (a list for an object, a string for a list, a nesting too deep to
parse) raises :class:`LoraError` naming the field.
"""

from __future__ import annotations

import json

from mindone_lora_plugin.errors import LoraError

SCALAR = (str, int, float, bool, type(None))
NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true or false"}


def parse(raw: bytes) -> dict:
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise LoraError("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise LoraError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise LoraError("the request body must be a JSON object")
    return data


def field(d: dict, key: str, kind: type, required: bool = True):
    """``d[key]`` when it is of ``kind`` (a missing optional one is ``kind()``); LoraError otherwise."""
    value = d.get(key)
    if value is None and not required:
        return kind()
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LoraError(f"{key!r} must be {NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    if kind is dict and key == "values":
        bad = [k for k, v in value.items() if not isinstance(v, SCALAR)]
        if bad:
            raise LoraError(f"values[{bad[0]!r}] must be a string, number or boolean")
    return value


def text(d: dict, key: str) -> str:
    """An optional string field (numbers accepted as their text); '' when missing."""
    value = d.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LoraError(f"{key!r} must be a string, got {type(value).__name__}")
    return str(value)


def loras(d: dict) -> list[dict]:
    items = field(d, "loras", list, required=False)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LoraError(f"loras[{i}] must be an object with path and weight")
        text(item, "path"), text(item, "weight")
    return items
