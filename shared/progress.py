"""How far a job is, from its handler to the consumer that owns it: the content stream's progress, for the heartbeat
that records it, and the moment XO has finished the copy, which frees the job's worker slot.

A job handler does not hold its job record: the consumer heartbeats the record while the handler runs (in a task
that inherits the consumer's context). So the consumer opens a ``ProgressBox`` around the handler
(``collecting``), the handler's stream ``report``\\ s into it, and every heartbeat writes the box's latest value
into the job record (shared/jobs.py ``beat``, claim-checked like every worker write). The handler calls
``copied()`` once XO answered its copy: what the job has left (waiting for XO's cache to show the result, clearing
the mark, recording and announcing the outcome) holds no XO copy, so the consumer gives the job's slot to the next
delivery meanwhile. Outside a job, ``report`` and ``copied`` do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """The latest progress reported by the handler of one job (None: nothing streamed yet), and what to do once its
    copy is over (``on_copied``, the consumer's)."""

    latest: StreamProgress | None = None
    on_copied: Callable[[], None] | None = None


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


def copied() -> None:
    """XO has finished the current job's copy: its worker slot may take the next job (nothing outside a job)."""
    box = _CURRENT.get()
    if box is not None and box.on_copied is not None:
        box.on_copied()
