"""Filter semantics of xo.getAllObjects in the simulator: lodash _.matches and the key:value string subset."""

from __future__ import annotations

import pytest

from services.xo_simulator.matching import compile_filter, is_match, parse_string_filter

SR = {"type": "SR", "name_label": "Local", "tags": ["k8s-migrating", "fast"], "size": 10,
      "shared": False, "other_config": {"a": "1", "b": {"c": 2}}, "parent": None}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"type": "SR"}, True),
        ({"type": "sr"}, False),  # exact, case-sensitive
        ({"name_label": "Loc"}, False),  # no substring for object filters
        ({"tags": ["k8s-migrating"]}, True),
        ({"tags": ["fast", "k8s-migrating"]}, True),  # any order
        ({"tags": []}, True),  # empty array matches any array
        ({"tags": ["k8s-migrating", "missing"]}, False),  # contains all
        ({"tags": ["fast", "fast"]}, False),  # each expected item uses a distinct element
        ({"other_config": {"a": "1"}}, True),  # nested partial
        ({"other_config": {"b": {"c": 2}}}, True),
        ({"other_config": {"b": {"c": 3}}}, False),
        ({"missing": None}, False),  # missing key never matches, even against null
        ({"parent": None}, True),
        ({"size": 10.0}, True),  # 10 === 10.0 in JS
        ({"shared": 0}, False),  # false !== 0
        ({"size": "10"}, False),
        ({"tags": "fast"}, False),
        ({}, True),
    ],
)
def test_object_filter_follows_lodash_matches(source: dict, expected: bool) -> None:
    assert is_match(SR, source) is expected


def test_string_filter_is_case_insensitive_substring_and_any_array_element() -> None:
    predicate = compile_filter('type:sr name_label:"loc" tags:migr')
    assert predicate(SR)
    assert not compile_filter("tags:slow")(SR)
    assert not compile_filter("nope:x")(SR)


def test_string_filter_rejects_terms_without_key_value() -> None:
    with pytest.raises(ValueError, match="key:value"):
        parse_string_filter("type:SR loose")


def test_no_filter_matches_everything() -> None:
    assert compile_filter(None)({})
