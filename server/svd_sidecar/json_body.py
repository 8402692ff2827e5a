"""JSON request bodies of the open front: only what can be forwarded to vLLM unchanged.

``json.loads`` accepts more than JSON: ``NaN``, ``Infinity`` and numbers that overflow to
``inf`` (``1e999``), and nesting up to the interpreter's recursion limit. Re-encoding such a
body for vLLM then fails (``allow_nan=False``, ``RecursionError``): a 500 after the body was
accepted. This module refuses them up front, with a 400 that names the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ApiError

__all__ = ["MAX_JSON_DEPTH", "parse_json_object"]

#: Deepest nesting of objects and arrays a proxied body may have. JSON schemas in tool and
#: structured-output requests nest a few dozen levels; a thousand breaks re-encoding.
MAX_JSON_DEPTH = 128


class _NonFinite(float):
    """A parsed ``NaN`` / ``Infinity`` / overflowing number, remembered by its source text."""

    text: str

    def __new__(cls, text: str) -> _NonFinite:
        out = super().__new__(cls, float("nan"))
        out.text = text
        return out


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object that re-encodes as strict JSON; ``ApiError(400, "json")``
    naming the field otherwise."""
    try:
        body = json.loads(raw, parse_constant=_NonFinite, parse_float=_parse_float)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # also UnicodeDecodeError and integers past the digit limit
        raise ApiError(400, "json", f"request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "json", "request body must be a JSON object")
    _check(body)
    return body


def _too_deep() -> ApiError:
    return ApiError(
        400, "json", f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    )


def _check(body: dict[str, Any]) -> None:
    """Walk the parsed body without recursion: depth, and no non-finite number anywhere."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
            where = where.lstrip(".")
            if isinstance(value, _NonFinite):
                raise ApiError(
                    400,
                    "json",
                    f"{where}: {value.text} is not a JSON number (numbers must be finite)",
                )
            if isinstance(value, dict | list):
                stack.append((value, where, depth + 1))
