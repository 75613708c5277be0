"""What happens to a REST content stream on its way: its pace, its faults, a pool XO loses under it.

``StreamWatch`` wraps one export or import (rest.py), during which XAPI has the VDI plugged into a control domain
(control_domain.py): it counts the bytes that pass, paces exports at the simulator's ``stream_rate_bps`` (0 = as
fast as the disk and the socket go), fires a fault rule's ``after_bytes`` once that many bytes passed, and cuts the
stream when XO loses the pool of the VDI (the harsher reading: the pipe between xo-server and XAPI breaks, so the
client sees its connection cut rather than a clean error) or when a client destroyed the control domain's VBD.
Faults on REST calls are rules whose ``method`` names the call exactly (``rest.vdi.create``, ``rest.vdi.get``,
``rest.vdi.delete``, ``rest.vdi.export``, ``rest.vdi.import``); ``*`` rules are for JSON-RPC methods only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from . import control_domain
from .faults import STREAM_METHODS, FaultRule

if TYPE_CHECKING:
    from .server import Simulator

CREATE = "rest.vdi.create"
GET = "rest.vdi.get"
DELETE = "rest.vdi.delete"
EXPORT, IMPORT = STREAM_METHODS


class StreamCut(Exception):
    """The stream must end here: ``rule`` is the fault rule that fired (None: XO lost the VDI's pool)."""

    def __init__(self, rule: FaultRule | None, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule

    @property
    def drops_connection(self) -> bool:
        """Cut the TCP connection (a drop_socket rule, a lost pool) rather than answer an error."""
        return self.rule is None or self.rule.kind == "drop_socket"


class StreamWatch:
    """One export or import of VDI ``vdi_id`` in pool ``pool_id``; ``passed(n)`` after every ``n`` bytes."""

    def __init__(self, sim: Simulator, method: str, vdi_id: str, pool_id: str, rule: FaultRule | None,
                 dom0_vbd: str | None = None) -> None:
        self._sim = sim
        self._dom0_vbd = dom0_vbd
        self._method = method
        self._vdi_id = vdi_id
        self._pool_id = pool_id
        self._rule = rule
        self._started = time.monotonic()
        self.bytes = 0

    def __enter__(self) -> StreamWatch:
        self._sim.stats.active_streams += 1
        self._sim.stats.streams[self._method] += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sim.stats.active_streams -= 1

    async def passed(self, count: int) -> None:
        """``count`` more bytes went through; StreamCut when the stream must end now."""
        self.bytes += count
        if self._rule is not None and self._rule.after_bytes is not None and self.bytes >= self._rule.after_bytes:
            rule, self._rule = self._rule, None
            raise StreamCut(rule, f"fault rule after {rule.after_bytes} bytes of {self._method} {self._vdi_id}")
        if not self._sim.mirror.is_connected(self._pool_id):
            raise StreamCut(None, f"XO lost pool {self._pool_id} during {self._method} {self._vdi_id}")
        if self._dom0_vbd is not None and not control_domain.still_plugged(self._sim.xapi, self._dom0_vbd):
            raise StreamCut(None, f"VBD {self._dom0_vbd} of the control domain was unplugged during {self._method} "
                                  f"{self._vdi_id}")
        rate_bps = self._sim.stream_rate_bps if self._method == EXPORT else 0  # read live: a test may release it
        if rate_bps > 0:
            ahead_s = self.bytes / rate_bps - (time.monotonic() - self._started)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)  # the simulated transfer rate, not synchronisation

    async def counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` passed through ``passed`` (for an import's body)."""
        async for chunk in chunks:
            yield chunk
            await self.passed(len(chunk))


def pick(sim: Simulator, method: str) -> FaultRule | None:
    """The fault rule that fires for REST call ``method`` now (rules naming it exactly), consuming its count."""
    return sim.faults.pick(method, exact=True)
