"""Every DomainError class of the project, the modules that define them imported, for the table-driven tests of
the error codes and the gRPC status table."""

from __future__ import annotations

import services.csi_frontend.filesystem  # noqa: F401  (FilesystemCorrupt)
import services.csi_frontend.mounter  # noqa: F401  (MountError)
import services.migrator.slots  # noqa: F401  (NotStarted)
import services.migrator.transfer  # noqa: F401  (TransferUnfinished)
import shared.locks  # noqa: F401  (LockLost)
import shared.xo.errors  # noqa: F401  (the XoError tree)
from shared.errors import DomainError, registered


def all_error_classes() -> list[type[DomainError]]:
    """Every subclass of DomainError that the registry took. A class whose ``__init_subclass__`` refused it (the
    tests of that refusal make some) stays among its base's ``__subclasses__`` until the garbage collector frees
    it, so whether a later test saw it depended on when the collector last ran."""
    found, todo = [DomainError], [DomainError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if registered().get(sub.code) is sub:
                found.append(sub)
                todo.append(sub)
    return found


def bare_instance(cls: type[DomainError], message: str = "x") -> DomainError:
    """An instance whatever the class's own constructor takes (MountError: argv, detail)."""
    error = cls.__new__(cls)
    DomainError.__init__(error, message)
    return error
