"""Nearest-rank quantiles of time to first token, spelled one way for /stats, shadow pairs and the judge."""

from __future__ import annotations

import math

TTFT_QUANTILES = (0.5, 0.9, 0.99)


def ttft_key(q: float) -> str:
    return f"ttft_p{round(q * 100)}_s"


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted `values`: p99 of 100 values is the 99th, not the largest."""
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None
