"""How far a job's content stream is, from the handler that streams to the heartbeat that records it.

A job handler does not hold its job record: the consumer heartbeats the record while the handler runs (in a task
that inherits the consumer's context). So the consumer opens a ``ProgressBox`` around the handler
(``collecting``), the handler's stream ``report``\\ s into it, and every heartbeat writes the box's latest value
into the job record (shared/jobs.py ``beat``, claim-checked like every worker write). Outside a job, ``report``
does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class StreamProgress(BaseModel):
    """Bytes of a content stream sent so far, of ``total_bytes``, at ``rate_bps`` (average since its start)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    done_bytes: int
    total_bytes: int
    rate_bps: float

    @property
    def fraction(self) -> float:
        """0..1 (1 for an empty stream)."""
        return min(self.done_bytes / self.total_bytes, 1.0) if self.total_bytes > 0 else 1.0


@dataclass
class ProgressBox:
    """The latest progress reported by the handler of one job (None: nothing streamed yet)."""

    latest: StreamProgress | None = None


_CURRENT: ContextVar[ProgressBox | None] = ContextVar("xocsi_job_progress", default=None)


@contextlib.contextmanager
def collecting(box: ProgressBox) -> Iterator[ProgressBox]:
    """Within the block (and tasks created in it), ``report`` writes into ``box``."""
    token = _CURRENT.set(box)
    try:
        yield box
    finally:
        _CURRENT.reset(token)


def report(progress: StreamProgress) -> None:
    """Record ``progress`` for the current job's next heartbeat (nothing outside a job)."""
    box = _CURRENT.get()
    if box is not None:
        box.latest = progress
