"""Transport-neutral domain errors. No gRPC or AMQP types live here.

Tree::

    DomainError                     retryable=False
    ├── InvalidRequest              bad or missing input; the message names the field and the fix
    ├── OutOfRange                  a capacity the driver cannot serve (CSI OUT_OF_RANGE)
    ├── VolumeNotFound              the volume (VDI) does not exist
    ├── NodeNotFound                the node (VM) does not exist
    ├── AlreadyExistsIncompatible   same name, incompatible parameters (e.g. other size)
    ├── OperationPending            another operation on the volume is in flight  (retryable)
    ├── CapacityExhausted           no SR with enough free space, or too many volumes on a node
    ├── PlacementImpossible         no usable SR for the requested topology (CreateVolume)
    ├── PreconditionFailed          the request is valid but the system is not in a state to serve it
    │   └── AttachedElsewhere       the volume is attached to another node
    ├── BackendUnavailable          XO, RabbitMQ or Redis cannot be reached now  (retryable)
    └── BackendFailure              XO answered with an error we cannot classify

Edges translate these exactly once: the CSI frontend in services/csi_frontend/status.py,
the migrator in its consumer (retryable -> requeue, else dead-letter).

Across processes an error travels as its class's stable ``code`` (``FailureReason.code``, the dead letter's
``x-xocsi-error-code``), never as a class name; ``error_class(code)`` maps a code back. Every subclass, here or
elsewhere (shared/xo/errors.py, shared/locks.py, ...), declares its own code; renaming a class changes nothing on
the wire. Records written before codes existed carry the class name: ``error_class`` reads those too.
"""

from __future__ import annotations

import re
from typing import ClassVar

_BY_CODE: dict[str, type[DomainError]] = {}
_BY_CLASS_NAME: dict[str, type[DomainError]] = {}  # the codes of the versions before stable codes
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class DomainError(Exception):
    """Base of every error a handler may raise on purpose. Subclasses MUST declare their code, unique and
    snake_case, in the class statement: ``class VolumeNotFound(DomainError, code="volume_not_found")``."""

    retryable: ClassVar[bool] = False
    code: ClassVar[str] = "domain_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, *, code: str = "", retryable: bool | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code
        if retryable is not None:
            cls.retryable = retryable
        _register(cls)


def _register(cls: type[DomainError]) -> None:
    code = cls.code
    if not _CODE_RE.match(code):
        raise TypeError(f"{cls.__qualname__} must declare its own stable snake_case `code`")
    if code in _BY_CODE:
        raise TypeError(f"{cls.__qualname__}.code {code!r} is already the code of {_BY_CODE[code].__qualname__}")
    _BY_CODE[code] = cls
    _BY_CLASS_NAME.setdefault(cls.__name__, cls)


def error_class(code: str) -> type[DomainError] | None:
    """The error class of a code received from another process (or of a class name that a version before stable
    codes wrote); None when no class has it (e.g. a newer version's code)."""
    return _BY_CODE.get(code) or _BY_CLASS_NAME.get(code)


def registered() -> dict[str, type[DomainError]]:
    """Every error class by code (those of the modules imported so far)."""
    return dict(_BY_CODE)


class InvalidRequest(DomainError, code="invalid_request"):
    """The request is malformed; the message says which field and how to fix it."""


class OutOfRange(DomainError, code="out_of_range"):
    """The requested capacity cannot be served (e.g. limit below required, or a shrink)."""


class VolumeNotFound(DomainError, code="volume_not_found"):
    """The volume does not exist (no VDI with that name or UUID)."""


class NodeNotFound(DomainError, code="node_not_found"):
    """The node (XO VM) does not exist."""


class AlreadyExistsIncompatible(DomainError, code="already_exists_incompatible"):
    """A volume with this name exists with incompatible parameters."""


class OperationPending(DomainError, code="operation_pending", retryable=True):
    """Another operation on the same volume is in progress; retry later."""


class CapacityExhausted(DomainError, code="capacity_exhausted"):
    """No SR has enough free space, or a node has no free device slot."""


class PlacementImpossible(DomainError, code="placement_impossible"):
    """No SR satisfies the requested parameters and topology."""


class PreconditionFailed(DomainError, code="precondition_failed"):
    """The request is valid but cannot be served in the current state."""


class AttachedElsewhere(PreconditionFailed, code="attached_elsewhere"):
    """The volume is attached to another node and does not allow multi-node access."""


class BackendUnavailable(DomainError, code="backend_unavailable", retryable=True):
    """A backend (XO, broker, Redis) is unreachable or timed out."""


class BackendFailure(DomainError, code="backend_failure"):
    """A backend answered with an error that has no better classification."""


_BY_CODE[DomainError.code] = DomainError
_BY_CLASS_NAME[DomainError.__name__] = DomainError
