"""Parameter validation of the XO simulator, as XO's ajv schemas report it (code 10)."""

from __future__ import annotations

import pytest

from services.xo_simulator.errors import XoApiError
from services.xo_simulator.params import Param, check, normalize, size_param

SCHEMA = {
    "id": Param("string"),
    "name_label": Param("string", optional=True),
    "name_description": Param("string0", optional=True),
    "size": Param("size", optional=True),
    "limit": Param("integer", optional=True),
    "flag": Param("boolean", optional=True),
    "count": Param("number", optional=True),
    "expiresIn": Param("number_or_string", optional=True),
}


def _errors(params: object) -> list[dict]:
    with pytest.raises(XoApiError) as info:
        check("vdi", SCHEMA, params)
    assert info.value.code == 10
    assert info.value.message == "invalid parameters"
    return list(info.value.data["errors"])


def test_valid_params_pass_and_integers_are_normalised() -> None:
    assert check("vdi", SCHEMA, {"id": "x", "name_description": "", "limit": 2.0, "size": "1GiB"}) == {
        "id": "x", "name_description": "", "limit": 2, "size": "1GiB"}


def test_unknown_key_is_rejected_with_ajv_like_error() -> None:
    assert _errors({"id": "x", "bogus": 1}) == [{
        "instancePath": "", "keyword": "additionalProperties", "params": {"additionalProperty": "bogus"},
        "message": "must NOT have additional properties"}]


def test_missing_required_and_wrong_types_are_all_reported() -> None:
    errors = _errors({"size": True, "flag": "yes", "limit": 1.5})
    assert {e["message"] for e in errors} == {
        "must have required property 'id'", "must be integer,string", "must be boolean", "must be integer"}
    assert {e["instancePath"] for e in errors} == {"", "/size", "/flag", "/limit"}


def test_numbers_and_number_or_string() -> None:
    assert check("vdi", SCHEMA, {"id": "x", "count": 1.5, "expiresIn": "1h"}) == {
        "id": "x", "count": 1.5, "expiresIn": "1h"}
    assert {e["message"] for e in _errors({"id": "x", "count": "1", "expiresIn": True})} == {
        "must be number", "must be number,string"}


def test_empty_string_is_rejected_unless_min_length_zero() -> None:
    assert _errors({"id": ""})[0]["message"] == "must NOT have fewer than 1 characters"
    assert _errors({"id": "x", "name_label": ""})[0]["instancePath"] == "/name_label"


def test_null_is_not_a_string() -> None:
    assert _errors({"id": "x", "name_label": None})[0]["message"] == "must be string"


def test_non_object_params_are_rejected() -> None:
    assert _errors(["x"])[0]["message"] == "must be object"


def test_question_mark_keys_are_used_when_known_and_dropped_otherwise() -> None:
    assert normalize("vdi", SCHEMA, {"id": "x", "flag?": True, "cbt?": True}) == {"id": "x", "flag": True}


def test_namespace_key_is_renamed_to_id() -> None:
    assert check("vdi", SCHEMA, {"vdi": "x"}) == {"id": "x"}
    assert normalize("vm", {"vm": Param("string"), "id": Param("string")}, {"vm": "y"}) == {"vm": "y"}


def test_size_param_parses_units_or_raises_code_10() -> None:
    assert size_param("size", "10GiB") == 10 * 1024**3
    assert size_param("size", 512) == 512
    with pytest.raises(XoApiError) as info:
        size_param("size", "ten gigs")
    assert info.value.code == 10
