"""The run's JSON document (every figure, configuration, round and the machine) and its markdown."""

from __future__ import annotations

from typing import Any

from nodeproxy_dev.bench import stats, targets
from nodeproxy_dev.bench.configurations import Configuration
from nodeproxy_dev.bench.vocabulary import Cell, Metric

SCHEMA = "nodeproxy-bench/1"
BASELINE = "direct"


def metric_entry(metric: Metric, scenario: str, once: bool, cells: dict[str, Cell],
                 configurations: list[Configuration]) -> dict[str, Any]:
    """One metric with, per configuration, its samples and summary or why it has none."""
    baseline = cells.get(BASELINE)
    baseline_median = stats.summarize(baseline)["median"] if baseline else None
    results: dict[str, Any] = {}
    for configuration in configurations:
        reason = configuration.unavailable()
        if reason is not None:
            results[configuration.name] = {"available": False, "reason": reason}
            continue
        cell = cells.get(configuration.name, Cell(not_applicable="not run"))
        summary = stats.summarize(cell)
        results[configuration.name] = {
            "available": True,
            **summary,
            "spread": stats.spread(summary),
            "ratio_to_direct": stats.ratio_to_baseline(cell, baseline) if baseline else None,
            "ratios_by_round": stats.paired_ratios(cell, baseline) if baseline else [],
            "ratio_of_medians": stats.ratio(summary["median"], baseline_median),
            "samples": cell.samples,
            "rounds": cell.rounds,
            "blocks": cell.blocks,
            "errors": cell.errors,
            "not_applicable": cell.not_applicable,
        }
    return {"key": metric.key, "title": metric.title, "unit": metric.unit,
            "better": metric.better, "digits": metric.digits, "scenario": scenario,
            "once": once, "results": results}


def missing(metrics: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every figure that was expected (available, applicable) but has no sample."""
    out = []
    for entry in metrics:
        for name, result in entry["results"].items():
            if result.get("available") and not result.get("not_applicable") and not result["n"]:
                reason = "; ".join(dict.fromkeys(result["errors"])) or "not measured"
                out.append({"metric": entry["key"], "configuration": name, "reason": reason})
    return out


# ---------------------------------------------------------------------------
# Markdown


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(result: dict[str, Any], digits: int, notes: list[str], label: str,
          show_ratio: bool) -> str:
    if not result.get("available"):
        return "n/a"
    if result.get("not_applicable"):
        return "—"
    if not result["n"]:
        reason = "; ".join(dict.fromkeys(result["errors"])) or "not measured"
        notes.append(f"{label}: {reason}")
        return f"not measured [{len(notes)}]"
    text = _number(result["median"], digits)
    if result["n"] > 1:
        text += f" ({_number(result['min'], digits)}–{_number(result['max'], digits)})"
    if show_ratio and result.get("ratio_to_direct") is not None:
        text += f" ×{result['ratio_to_direct']:.2f}"
    return text


def markdown(doc: dict[str, Any]) -> str:
    """The table for the README: one row per figure, one column per configuration that ran."""
    columns = [c["name"] for c in doc["configurations"] if c["available"]]
    settings = doc["settings"]
    blocks = doc.get("blocks") or [columns]
    order = f"configurations alternated {' → '.join(blocks[0])} in every round"
    if len(blocks) > 1:
        later = "; then ".join(" → ".join(block) for block in blocks[1:])
        order += (f", then {later} (daemons restarted with their settings; the blocks swap "
                  f"order every other round; {BASELINE} is measured in each block and ratios "
                  "pair within it)")
    lines = [
        f"nodeproxy bench, {settings['profile']} profile: {settings['rounds']} round(s), "
        f"{order}; {doc['duration_s']:.0f} s in all.",
        "",
        f"Machine: {doc['machine_line']}.",
        "",
        "Cells: median (min–max over the rounds) ×ratio to direct (median of the per-round "
        "ratios); — = not applicable.",
        "",
        "| figure | unit | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    notes: list[str] = []
    for entry in doc["metrics"]:
        cells = [_cell(entry["results"][name], entry["digits"], notes,
                       f"{entry['title']}, {name}", name != BASELINE) for name in columns]
        lines.append(f"| {entry['title']} | {entry['unit']} | " + " | ".join(cells) + " |")
    if doc.get("targets"):
        lines += targets.markdown(doc["targets"])
    if notes:
        lines += ["", "Not measured:"]
        lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    lines += ["", "Configurations:"]
    for c in doc["configurations"]:
        status = "" if c["available"] else f" — **{c['reason']}**"
        lines.append(f"- `{c['name']}`: {c['summary']}{status}")
    if doc.get("notes"):
        lines += ["", "Notes:"]
        lines += [f"- {note}" for note in doc["notes"]]
    if doc.get("errors"):
        lines += ["", "Errors:"]
        lines += [f"- {error}" for error in doc["errors"]]
    return "\n".join(lines) + "\n"
