"""Every Prometheus metric of the project, defined once, and a small async /metrics endpoint.

Names follow Prometheus conventions: ``xocsi_`` prefix, base units (seconds, bytes), ``_total`` for counters.
Each service serves its own process's metrics on ``--metrics-port`` (0 = off).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from shared import health

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SLOT_WAIT_BUCKETS_S = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_MIGRATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

CSI_REQUESTS = Counter("xocsi_csi_requests", "CSI RPCs answered, by method and gRPC code", ["method", "code"])
CSI_DURATION = Histogram("xocsi_csi_request_duration_seconds", "CSI RPC latency", ["method"],
                         buckets=_LATENCY_BUCKETS_S)
XO_CALLS = Counter("xocsi_xo_calls", "XO JSON-RPC calls, by method and outcome (ok or the error class)",
                   ["method", "outcome"])
XO_DURATION = Histogram("xocsi_xo_call_duration_seconds", "XO JSON-RPC call latency", ["method"],
                        buckets=_LATENCY_BUCKETS_S)
JOBS_ENQUEUED = Counter("xocsi_migration_jobs_enqueued", "migration jobs published by the frontend")
JOBS_JOINED = Counter("xocsi_migration_jobs_joined", "publishes that joined a job already in flight")
PUBLISH_WAIT = Histogram("xocsi_migration_publish_wait_seconds",
                         "time a ControllerPublishVolume waited for its disk's migration, by outcome",
                         ["outcome"], buckets=_MIGRATION_BUCKETS_S)
JOBS_STARTED = Counter("xocsi_migration_jobs_started", "migration jobs claimed by a worker")
JOBS_FINISHED = Counter("xocsi_migration_jobs_finished",
                        "migration jobs finished by a worker: succeeded, failed, dead_lettered, requeued; "
                        "given_back: put back unstarted (no copy slot of its worker freed in time); "
                        "republished: a stale queued job published again by the reaper", ["outcome"])
JOBS_RUNNING = Gauge("xocsi_migration_jobs_running", "migration jobs this worker runs now (claimed, not finished): "
                     "RabbitMQ no longer counts them once claimed, so autoscaling adds this to the queue length")
MIGRATION_DURATION = Histogram("xocsi_migration_duration_seconds", "vdi.migrate time of a disk",
                               buckets=_MIGRATION_BUCKETS_S)
MIGRATION_BYTES = Counter("xocsi_migration_bytes", "virtual size of the disks migrated")
LOCK_WAIT = Histogram("xocsi_disk_lock_wait_seconds", "time to acquire a disk's Redis lock",
                      buckets=_LATENCY_BUCKETS_S)
STREAM_BYTES = Counter("xocsi_migration_stream_bytes", "bytes streamed into target disks by cross-pool moves and "
                       "clones (REST export -> import)")
STREAM_PROGRESS = Gauge("xocsi_migration_stream_progress_ratio", "how far each running content stream is (0..1), "
                        "by the disk it fills; the series goes away when the stream ends", ["disk"])
STREAMS_RUNNING = Gauge("xocsi_migration_streams_running", "content streams running in this process")
STREAM_DURATION = Histogram("xocsi_migration_stream_duration_seconds", "time of one content stream (cross-pool "
                            "move or clone)", buckets=_MIGRATION_BUCKETS_S)
SR_SLOT_WAIT = Histogram("xocsi_sr_slot_wait_seconds", "time a migration waited for a slot on its source and target "
                         "SRs (per-SR limit on)", buckets=_SLOT_WAIT_BUCKETS_S)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def serving(port: int, host: str = "0.0.0.0", *,
                  readiness: Callable[[], Awaitable[health.Report]] | None = None) -> AsyncIterator[int]:
    """Serve GET /metrics on ``port`` (0: not served) for the duration of the block; yields the bound port.

    With ``readiness``, also GET /readyz (200, or 503 naming the failing checks) and GET /livez (200 while the
    event loop answers: it never depends on XO, RabbitMQ or Redis, so a liveness probe never restarts the
    process for what a restart cannot fix)."""
    if port == 0:
        yield 0
        return
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    if readiness is not None:
        check = readiness

        async def readyz(_: web.Request) -> web.Response:
            return health.http_answer(*await check())

        async def livez(_: web.Request) -> web.Response:
            return health.http_answer(True, {})

        app.router.add_get("/readyz", readyz)
        app.router.add_get("/livez", livez)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()
