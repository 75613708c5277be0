"""The server interceptor: binds log context, bounds the handler by the caller's deadline, logs one
line per RPC and turns domain errors into gRPC statuses through status.py (the only place that aborts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from services.csi_frontend.status import code_for
from shared.errors import DomainError
from shared.logging import get_logger

log = get_logger(__name__)

DEADLINE_MARGIN_S = 0.25

Observer = Callable[[str, str, float], None]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every unary-unary handler; ``observe(method, code, seconds)`` feeds metrics."""

    def __init__(self, observe: Observer | None = None) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        behavior = handler.unary_unary

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._run(method, behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _run(self, method: str, behavior: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        structlog.contextvars.bind_contextvars(rpc=method, volume_id=getattr(request, "volume_id", None) or None)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            remaining = context.time_remaining()
            budget = None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.001)
            async with asyncio.timeout(budget):
                return await behavior(request, context)
        except DomainError as exc:
            code = code_for(exc)
            await _abort(context, code, exc.message, started)
        except TimeoutError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            await _abort(context, code, f"{method} did not finish before the caller's deadline; retry", started)
        except NotImplementedError:
            # the generated base servicers raise it for RPCs this driver leaves out (snapshots, modify):
            # spec "Call not implemented" is UNIMPLEMENTED, not a crash
            code = grpc.StatusCode.UNIMPLEMENTED
            await _abort(context, code, f"{method} is not implemented by this driver; see its capabilities "
                         "(GetPluginCapabilities, ControllerGetCapabilities, NodeGetCapabilities)", started)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("rpc_crashed", duration_ms=_ms(started))
            await context.abort(code, f"internal error in {method}: {type(exc).__name__}; see the driver log")
        finally:
            if code == grpc.StatusCode.OK:
                log.info("rpc_finished", grpc_code="OK", duration_ms=_ms(started))
            if self._observe is not None:
                self._observe(method, code.name, time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("rpc", "volume_id")
        raise AssertionError("unreachable")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, started: float) -> None:
    level = "warning" if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE) else "info"
    getattr(log, level)("rpc_finished", grpc_code=code.name, error=message, duration_ms=_ms(started))
    await context.abort(code, message)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
