"""Every Redis key name this project writes, and the SCAN patterns over them, built from the key prefix
(``REDIS_KEY_PREFIX``, default ``xocsi:``). Nothing else formats a Redis key; queue and exchange names live in
shared/messages.py.

    <prefix>lock:disk:<disk>        the disk's lock (shared/locks.py DiskLock)
    <prefix>job:disk:<disk>         the disk's migration job record (shared/jobs.py)
    <prefix>job:last:<disk>         the disk's last finished job, which late copies of older requests lose to
    <prefix>slots:sr:<sr>           leases on an SR's migration slots (shared/locks.py SrSlots)
    <prefix>slots:sr:<sr>:freed     the doorbell a release of one of those slots rings
    <prefix>lease:<task>            which controller replica runs a singleton task (shared/locks.py Lease)
"""

from __future__ import annotations


def disk_lock_key(prefix: str, disk_name: str) -> str:
    return f"{prefix}lock:disk:{disk_name}"


def disk_job_key(prefix: str, disk_name: str) -> str:
    return f"{prefix}job:disk:{disk_name}"


def disk_last_job_key(prefix: str, disk_name: str) -> str:
    """The disk's last finished job (shared/jobs.py ``JobStore.finish``): a late request older than it is dropped."""
    return f"{prefix}job:last:{disk_name}"


def sr_slots_key(prefix: str, sr_id: str) -> str:
    """Sorted set of the leases on an SR's migration slots (member: lease token, score: expiry in Redis ms)."""
    return f"{prefix}slots:sr:{sr_id}"


def sr_doorbell_key(prefix: str, sr_id: str) -> str:
    """List a release of a slot on the SR pushes to, so that a waiter (BLPOP) tries again at once."""
    return f"{prefix}slots:sr:{sr_id}:freed"


def lease_key(prefix: str, task: str) -> str:
    """The lease naming the one controller replica that runs ``task`` (e.g. ``temp-cleanup``)."""
    return f"{prefix}lease:{task}"


def disk_job_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every job record under ``prefix`` (glob characters in the prefix escaped)."""
    return f"{_glob_escape(prefix)}job:disk:*"


def disk_last_job_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every disk's last finished job under ``prefix`` (glob characters escaped)."""
    return f"{_glob_escape(prefix)}job:last:*"


def is_disk_last_job_key(prefix: str, key: str) -> bool:
    """Whether ``key`` is a disk's last finished job: kept for days on purpose, never a leftover of a job."""
    return key.startswith(f"{prefix}job:last:")


def all_keys_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every key under ``prefix`` (glob characters in the prefix escaped)."""
    return f"{_glob_escape(prefix)}*"


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
