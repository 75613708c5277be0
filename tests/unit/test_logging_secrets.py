"""shared/logging.py: a logged traceback never shows frame locals, where a sign-in payload or headers may hold a
secret (structlog's JSON and rich console tracebacks show locals by default)."""

from __future__ import annotations

import pytest

from shared.logging import get_logger
from tests.support.logs import configured_logging

SECRET = "tok-5b4a39281706f5e4d3c2b1a0ffee"


def _sign_in() -> None:
    params = {"token": SECRET}
    raise ConnectionError(f"sign-in failed ({len(params)} field)")


@pytest.mark.parametrize("json_output", [True, False])
def test_tracebacks_carry_no_locals(json_output: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with configured_logging("info", json=json_output):
        try:
            _sign_in()
        except ConnectionError:
            get_logger("test").exception("sign_in_failed")
        err = capsys.readouterr().err
    assert "sign_in_failed" in err and "sign-in failed (1 field)" in err and "_sign_in" in err
    assert SECRET not in err
