"""Median, spread and ratio to the direct baseline of the samples of one cell."""

from __future__ import annotations

import statistics
from typing import Any

from nodeproxy.bench.model import Cell


def summarize(cell: Cell) -> dict[str, Any]:
    """median, min, max and n of the samples (None values when there are none)."""
    if not cell.samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(cell.samples), "min": min(cell.samples),
            "max": max(cell.samples), "n": len(cell.samples)}


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None if either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def spread(summary: dict[str, Any]) -> float | None:
    """(max - min) / median: how far apart the rounds were, relative to the median."""
    if not summary["n"] or not summary["median"]:
        return None
    return float((summary["max"] - summary["min"]) / summary["median"])
