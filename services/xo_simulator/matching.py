"""Filters of xo.getAllObjects: lodash ``_.matches`` for object filters, a small ``key:value`` syntax for strings.

Pure functions, no I/O. Object filter rules (lodash baseIsMatch with PARTIAL|UNORDERED):
primitives compare with ``===`` (no 1 == true), arrays mean "contains all, any order", nested
objects match partially, and a key missing from the object never matches.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]


def is_match(obj: Mapping[str, Any], source: Mapping[str, Any]) -> bool:
    """Return whether ``obj`` matches the partial ``source`` the way lodash ``_.isMatch`` does."""
    for key, expected in source.items():
        if key not in obj or not _equal(expected, obj[key]):
            return False
    return True


def _equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and is_match(actual, expected)
    if isinstance(expected, list):
        return isinstance(actual, list) and _contains_all(actual, expected)
    return _strict_equal(expected, actual)


def _contains_all(actual: list[Any], expected: list[Any]) -> bool:
    # lodash equalArrays with PARTIAL: each expected item consumes a distinct actual item.
    if len(expected) > len(actual):
        return False
    seen: set[int] = set()
    for item in expected:
        index = next(
            (i for i, candidate in enumerate(actual) if i not in seen and _equal(item, candidate)),
            None,
        )
        if index is None:
            return False
        seen.add(index)
    return True


def _strict_equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return expected == actual
    return type(expected) is type(actual) and bool(expected == actual)


def parse_string_filter(text: str) -> dict[str, str]:
    """Parse ``key:value`` terms separated by spaces (values may be quoted); ValueError otherwise.

    This is a small subset of XO's complex-matcher: every term is ANDed, and a term matches when the
    object's property, or any element of an array property, contains the value case-insensitively.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot parse filter {text!r}: {exc}") from exc
    terms: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition(":")
        if not sep or not key or not value:
            raise ValueError(f"filter term {word!r} is not of the form key:value")
        terms[key] = value
    return terms


def _substring_match(obj: Mapping[str, Any], terms: Mapping[str, str]) -> bool:
    for key, needle in terms.items():
        if key not in obj:
            return False
        value = obj[key]
        values = value if isinstance(value, list) else [value]
        if not any(needle.lower() in _text(item).lower() for item in values):
            return False
    return True


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def compile_filter(source: Mapping[str, Any] | str | None) -> Predicate:
    """Return a predicate for an object filter, a string filter (see parse_string_filter) or None (all)."""
    if source is None:
        return lambda _obj: True
    if isinstance(source, str):
        terms = parse_string_filter(source)
        return lambda obj: _substring_match(obj, terms)
    return lambda obj: is_match(obj, source)
