"""How the benchmarks print their figures: percentiles of samples, one line per measurement."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    ordered = sorted(samples_s)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000, "max_ms": ordered[-1] * 1000}


def show(title: str, values: dict[str, float]) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))


def show_target(title: str, value: float, unit: str, target: float, *, higher_is_better: bool = False) -> None:
    """One figure beside its target, with ``ok`` or ``MISSED``."""
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    print(f"{title}: {value:.2f}{(' ' + unit) if unit else ''} (target {sign} {target:g}{(' ' + unit) if unit else ''}"
          f"): {'ok' if met else 'MISSED'}")
