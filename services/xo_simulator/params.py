"""Parameter schemas of API methods and their validation, with ajv-like errors as XO reports them (code 10).

Rules (XO-API.md §3): every parameter is required unless optional; unknown keys are rejected; a key
ending in ``?`` is used when known and silently dropped otherwise; strings are non-empty unless kind
``string0``; a missing ``id`` is taken from a key named after the namespace (``vdi.set {vdi}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared.units import parse_size

from .errors import invalid_parameters

Kind = Literal["string", "string0", "boolean", "integer", "number", "number_or_string", "size", "filter", "object"]


@dataclass(frozen=True)
class Param:
    """One parameter of a method schema."""

    kind: Kind
    optional: bool = False


Schema = Mapping[str, Param]

_TYPE_NAMES: dict[Kind, str] = {
    "string": "string",
    "string0": "string",
    "boolean": "boolean",
    "integer": "integer",
    "number": "number",
    "number_or_string": "number,string",
    "size": "integer,string",
    "filter": "object,string",
    "object": "object",
}


def normalize(namespace: str, schema: Schema, params: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the ``?`` key rule and the namespace -> ``id`` rename; returns a new dict."""
    result: dict[str, Any] = {}
    for key, value in params.items():
        if key.endswith("?"):
            bare = key[:-1]
            if bare in schema and bare not in params:
                result[bare] = value
            continue
        result[key] = value
    if "id" in schema and "id" not in result and namespace not in schema and namespace in result:
        result["id"] = result.pop(namespace)
    return result


def validate(schema: Schema, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return ajv-like errors (empty when valid)."""
    errors: list[dict[str, Any]] = []
    for name, param in schema.items():
        if name not in params:
            if not param.optional:
                errors.append(_error("", "required", {"missingProperty": name},
                                     f"must have required property '{name}'"))
            continue
        error = _check_value(name, param.kind, params[name])
        if error is not None:
            errors.append(error)
    for name in params:
        if name not in schema:
            errors.append(_error("", "additionalProperties", {"additionalProperty": name},
                                 "must NOT have additional properties"))
    return errors


def _check_value(name: str, kind: Kind, value: Any) -> dict[str, Any] | None:
    path = f"/{name}"
    if not _has_type(kind, value):
        type_name = _TYPE_NAMES[kind]
        return _error(path, "type", {"type": type_name}, f"must be {type_name}")
    if kind in ("string", "size") and value == "":
        return _error(path, "minLength", {"limit": 1}, "must NOT have fewer than 1 characters")
    return None


def _has_type(kind: Kind, value: Any) -> bool:
    is_int = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    checks: dict[Kind, bool] = {
        "string": isinstance(value, str),
        "string0": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": is_int,
        "number": is_number,
        "number_or_string": is_number or isinstance(value, str),
        "size": is_int or isinstance(value, str),
        "filter": isinstance(value, Mapping | str),
        "object": isinstance(value, Mapping),
    }
    return checks[kind]


def _error(path: str, keyword: str, params: dict[str, Any], message: str) -> dict[str, Any]:
    return {"instancePath": path, "keyword": keyword, "params": params, "message": message}


def check(namespace: str, schema: Schema, params: Any) -> dict[str, Any]:
    """Normalize and validate ``params``; raises XO invalidParameters (code 10) when invalid."""
    if not isinstance(params, Mapping):
        raise invalid_parameters([_error("", "type", {"type": "object"}, "must be object")])
    normalized = normalize(namespace, schema, params)
    errors = validate(schema, normalized)
    if errors:
        raise invalid_parameters(errors)
    for name, param in schema.items():
        if param.kind == "integer" and name in normalized:
            normalized[name] = int(normalized[name])
    return normalized


def size_param(name: str, value: int | float | str) -> int:
    """Parse a validated ``size`` parameter (bytes or "10GiB"); raises code 10 when unparsable."""
    try:
        return parse_size(int(value) if isinstance(value, float) else value)
    except ValueError as exc:
        raise invalid_parameters(
            [_error(f"/{name}", "format", {}, str(exc))], f"invalid parameters: {exc}"
        ) from exc
