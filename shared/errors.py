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
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a handler may raise on purpose."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(DomainError):
    """The request is malformed; the message says which field and how to fix it."""


class OutOfRange(DomainError):
    """The requested capacity cannot be served (e.g. limit below required, or a shrink)."""


class VolumeNotFound(DomainError):
    """The volume does not exist (no VDI with that name or UUID)."""


class NodeNotFound(DomainError):
    """The node (XO VM) does not exist."""


class AlreadyExistsIncompatible(DomainError):
    """A volume with this name exists with incompatible parameters."""


class OperationPending(DomainError):
    """Another operation on the same volume is in progress; retry later."""

    retryable = True


class CapacityExhausted(DomainError):
    """No SR has enough free space, or a node has no free device slot."""


class PlacementImpossible(DomainError):
    """No SR satisfies the requested parameters and topology."""


class PreconditionFailed(DomainError):
    """The request is valid but cannot be served in the current state."""


class AttachedElsewhere(PreconditionFailed):
    """The volume is attached to another node and does not allow multi-node access."""


class BackendUnavailable(DomainError):
    """A backend (XO, broker, Redis) is unreachable or timed out."""

    retryable = True


class BackendFailure(DomainError):
    """A backend answered with an error that has no better classification."""
