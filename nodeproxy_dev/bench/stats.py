"""Median, spread and ratio to the direct baseline of the samples of one cell."""

from __future__ import annotations

import statistics
from typing import Any

from nodeproxy_dev.bench.vocabulary import Cell


def summarize(cell: Cell) -> dict[str, Any]:
    """median, min, max and n of the samples (None values when there are none)."""
    if not cell.samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(cell.samples), "min": min(cell.samples),
            "max": max(cell.samples), "n": len(cell.samples)}


def paired_ratios(cell: Cell, baseline: Cell) -> list[float]:
    """value / baseline of the same round, and of the same block of it where the baseline
    was measured there, for every sample whose round the baseline has."""
    slots, rounds = baseline.by_slot(), baseline.by_round()
    out = []
    for (r, block), value in cell.by_slot().items():
        base = slots.get((r, block)) or rounds.get(r)
        if base:
            out.append(value / base)
    return out


def paired_differences(cell: Cell, baseline: Cell) -> Cell:
    """value - baseline of the same round (and block, as ``paired_ratios`` pairs them), as a
    cell with the rounds and blocks of ``cell``; samples without a baseline are left out
    and said in its errors."""
    slots, rounds = baseline.by_slot(), baseline.by_round()
    out = Cell()
    for (r, block), value in cell.by_slot().items():
        base = slots.get((r, block), rounds.get(r))
        if base is None:
            out.errors.append(f"the baseline has no figure in round {r} to subtract")
        else:
            out.add(value - base, r, block)
    return out


def ratio_to_baseline(cell: Cell, baseline: Cell) -> float | None:
    """The median of the per-round ratios to the baseline.

    Each round measures the configurations back to back, so a ratio within one
    round compares like with like even when the machine's state changes between
    rounds (it does, see docs/benchmarks.md); the median over rounds then damps
    the rounds where it changed in the middle.
    """
    ratios = paired_ratios(cell, baseline)
    return statistics.median(ratios) if ratios else None


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
