"""handle(request, deps): run one job of either kind (shared/messages.py) — a migration (migrate.py, which moves a
disk across pools through transfer.py) or a clone (clone.py)."""

from __future__ import annotations

from services.migrator import clone, migrate
from services.migrator.migrate import HandlerDeps
from shared.messages import CloneRequested, JobRequest, MigrationFinished


async def handle(request: JobRequest, deps: HandlerDeps) -> MigrationFinished:
    """The job's outcome; raises the domain errors of the handler of its kind."""
    if isinstance(request, CloneRequested):
        return await clone.handle(request, deps)
    return await migrate.handle(request, deps)
