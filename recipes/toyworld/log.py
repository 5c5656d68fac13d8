"""The run's log lines: seconds since start, stage, message."""

from __future__ import annotations

import time
from typing import Any

_START = time.perf_counter()


def seconds_since_start() -> float:
    """Seconds since the recipe was imported, which the log and ``metrics.json`` count from."""
    return time.perf_counter() - _START


def log(stage: str, message: str) -> None:
    """Prints one line, flushed at once so a log tailed during a long run is current."""
    print(f"[{seconds_since_start():8.1f}s] {stage:>6} | {message}", flush=True)


def fmt(values: dict[str, Any]) -> str:
    """``{"a": 0.5, "b": 2}`` → ``"a 0.500  b 2"``."""
    return "  ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )
