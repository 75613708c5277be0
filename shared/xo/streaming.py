"""Copying a disk's content from one VDI into another through XO's REST export and import (no spooling).

``stream_copy`` composes XoRest.export -> (vhd: shared.vhd_stream.with_exact_length) -> XoRest.import_, with a
throttled progress callback for the job record. The VDIs may be in different pools of the same XO.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from shared.vhd import VhdError, VhdTruncated
from shared.vhd_stream import with_exact_length
from shared.xo.errors import XoError, XoNotFound, XoUnavailable
from shared.xo.rest import Format, XoRest


@dataclass(frozen=True)
class Progress:
    """How far a copy is: bytes sent into the target so far, of ``total_bytes``."""

    done_bytes: int
    total_bytes: int
    elapsed_s: float

    @property
    def rate_bps(self) -> float:
        """Average bytes per second since the start (0 before any time has passed)."""
        return self.done_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[Progress], Awaitable[None]]


@dataclass(frozen=True)
class CopyResult:
    """What a finished copy sent: the body length and how long it took."""

    bytes_sent: int
    duration_s: float

    @property
    def rate_bps(self) -> float:
        return self.bytes_sent / self.duration_s if self.duration_s > 0 else 0.0


async def stream_copy(rest: XoRest, src_vdi: str, dst_vdi: str, fmt: Format, *,
                      progress: ProgressCallback | None = None, progress_interval_s: float = 1.0) -> CopyResult:
    """Stream the content of ``src_vdi`` into ``dst_vdi`` (which must be at least as large), in ``fmt``.

    vhd sends only the allocated blocks, its exact length computed from the VHD head; raw sends the whole
    virtual size. ``progress`` is awaited at the start, at most every ``progress_interval_s`` while sending,
    and once at the end. Not idempotent but repeatable: a retry rewrites the whole content. Raises XoNotFound
    (a VDI XO does not show), XoUnavailable (a broken or stalled transfer, a truncated export: retryable),
    XoError (XO refused the import, or its export is not a valid VHD). On failure the target holds part of
    the content: the caller deletes or rewrites it.
    """
    started = time.monotonic()
    raw_length = await _raw_length(rest, src_vdi) if fmt == "raw" else 0
    async with rest.export(src_vdi, fmt) as chunks:
        with _source_errors(src_vdi):
            if fmt == "vhd":
                length, body = await with_exact_length(chunks)
            else:
                length, body = raw_length, chunks
            meter = _Meter(length, started, progress, progress_interval_s)
            await meter.report(0)
            await rest.import_(dst_vdi, fmt, length, meter.count(body))
    await meter.report(length, force=True)
    return CopyResult(bytes_sent=length, duration_s=time.monotonic() - started)


@contextlib.contextmanager
def _source_errors(src_vdi: str) -> Iterator[None]:
    """What the VHD reader finds wrong with the export becomes an XoError (truncation: retryable)."""
    try:
        yield
    except VhdTruncated as exc:
        raise XoUnavailable(f"the export of VDI {src_vdi} ended early: {exc}", method="stream_copy") from exc
    except VhdError as exc:
        raise XoError(f"the export of VDI {src_vdi} is not a valid VHD: {exc}", method="stream_copy") from exc


async def _raw_length(rest: XoRest, src_vdi: str) -> int:
    vdi = await rest.get_vdi(src_vdi)
    if vdi is None:
        raise XoNotFound(f"XO does not show VDI {src_vdi}: cannot size its raw export", method="stream_copy")
    return vdi.size


class _Meter:
    def __init__(self, total: int, started: float, callback: ProgressCallback | None, interval_s: float) -> None:
        self._total = total
        self._started = started
        self._callback = callback
        self._interval_s = interval_s
        self._last_s = -float("inf")
        self.done = 0

    async def report(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._callback is None or (not force and now - self._last_s < self._interval_s):
            return
        self._last_s = now
        await self._callback(Progress(done, self._total, now - self._started))

    async def count(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            self.done += len(chunk)
            await self.report(self.done)
