"""xo-server's own retries in the simulator: tries, matching errors, the last error reaching the caller."""

from __future__ import annotations

import pytest

from services.xo_simulator.errors import SimError, XapiError, vdi_in_use
from services.xo_simulator.retry import RetryPolicy, has_xapi_code, has_xo_code


async def test_retries_matching_errors_up_to_ten_tries_then_raises_the_last() -> None:
    calls: list[int] = []

    async def busy() -> str:
        calls.append(1)
        raise XapiError("TOO_MANY_STORAGE_MIGRATES", [str(len(calls))])

    with pytest.raises(XapiError) as info:
        await RetryPolicy(has_xapi_code("TOO_MANY_STORAGE_MIGRATES"), 0).run(busy)
    assert len(calls) == 10 and info.value.params == ["10"]


async def test_other_errors_and_success_end_the_retries_at_once() -> None:
    attempts: list[SimError] = [vdi_in_use("v", "destroy"), XapiError("HANDLE_INVALID", ["VDI", "r"])]

    async def flaky() -> str:
        raise attempts.pop(0)

    with pytest.raises(XapiError, match="HANDLE_INVALID"):
        await RetryPolicy(has_xo_code(17), 0).run(flaky)
    assert attempts == []

    async def fine() -> str:
        return "ok"

    assert await RetryPolicy(has_xo_code(17), 0).run(fine) == "ok"
