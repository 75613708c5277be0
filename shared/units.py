"""Byte-size parsing and formatting ("10GiB", "1G", 1073741824), as XO's parseSize accepts them, and durations
("300s", "5m") as the services' flags take them.

Pure functions only; no I/O.
"""

from __future__ import annotations

import re

MiB = 1024**2  # binary units, for sizes written in code (tests, benchmarks): 64 * MiB
GiB = 1024**3
DISK_STEP = 2 * MiB  # XAPI sizes a VHD disk in whole 2 MiB blocks: it rounds a create's or a resize's size up


def disk_step_up(size: int) -> int:
    """``size`` rounded up to a whole DISK_STEP (at least one): the size XAPI gives a disk asked for ``size``."""
    return max(DISK_STEP, -(-size // DISK_STEP) * DISK_STEP)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_size(value: int | str) -> int:
    """Return a size in bytes from an int or a string such as ``"10GiB"``, ``"1G"`` or ``"512"``.

    Raises ValueError naming the bad value when it cannot be parsed or is negative.
    """
    if isinstance(value, bool):
        raise ValueError(f"size must be a number of bytes or a string like '10GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"size {value!r} is not a byte count or a size like '10GiB', '512MiB', '1G'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size_bytes: int) -> str:
    """Return a short human form with binary units, e.g. ``1.5 GiB``."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}".replace(".0 ", " ")
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration_s(value: str | float) -> float:
    """``300s``, ``5m``, ``1.5h``, ``250ms`` or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"duration {value!r} must look like 300s, 5m, 250ms or a number of seconds")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * factor
