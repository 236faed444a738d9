"""What `nodeproxy stat` and `nodeproxy top` share: their flags, reading GET /stats/live
from a daemon's admin API, and drawing its figures as tables like `linkerd viz stat`."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from nodeproxy.ports import ADMIN_PORT

DEFAULT_ADMIN = f"http://127.0.0.1:{ADMIN_PORT}"


class AdminUnreachable(Exception):
    """The admin API did not answer with figures; the message names the address."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default=DEFAULT_ADMIN,
                        help="the daemon's admin API (default %(default)s)")
    parser.add_argument("--window", type=int, default=None,
                        help="seconds of traffic the figures cover, up to the daemon's "
                             "admin.liveStatsSeconds (default 60, or all it keeps if less)")
    parser.add_argument("-n", "--namespace", default=None,
                        help="only workloads and routes of this namespace")
    parser.add_argument("--by", choices=("all", "workload", "route"), default="all",
                        help="which table to print (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's JSON document instead of tables")


def fetch(admin: str, window: int | None, namespace: str | None, timeout: float = 5.0
          ) -> dict[str, Any]:
    query = {"window": str(window)} if window is not None else {}
    if namespace:
        query["namespace"] = namespace
    url = f"{admin.rstrip('/')}/stats/live"
    if query:
        url += f"?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            document: dict[str, Any] = json.load(response)
            return document
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            reason = e.reason
        raise AdminUnreachable(f"{url}: HTTP {e.code}: {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AdminUnreachable(f"cannot read the admin API at {admin} (is the nodeproxy "
                               f"daemon running there?): {reason}") from None


def select(document: dict[str, Any], by: str) -> dict[str, Any]:
    """The document with only the table --by asks for."""
    if by == "workload":
        return {k: v for k, v in document.items() if k != "routes"}
    if by == "route":
        return {k: v for k, v in document.items() if k != "workloads"}
    return document


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _rps(value: float, requests: int) -> str:
    return "-" if not requests else f"{value:.1f}rps"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}ms" if value < 10 else f"{value:.0f}ms"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in (header, *rows)]


WORKLOAD_HEADER = ("NAMESPACE", "NAME", "DIRECTION", "SUCCESS", "RPS", "LATENCY_P50",
                   "LATENCY_P95", "LATENCY_P99", "TCP_CONN", "BYTES_IN", "BYTES_OUT")
ROUTE_HEADER = ("NAMESPACE", "SERVICE", "ROUTE", "REQUESTS", "SUCCESS", "RPS",
                "LATENCY_P50", "LATENCY_P95", "LATENCY_P99")


def workload_lines(document: dict[str, Any]) -> list[str]:
    rows = []
    for w in document.get("workloads", []):
        latency, tcp = w["latency_ms"], w["tcp"]
        rows.append((w["namespace"], w["name"], w["direction"], _percent(w["success_rate"]),
                     _rps(w["rps"], w["requests"]), _ms(latency["p50"]), _ms(latency["p95"]),
                     _ms(latency["p99"]), str(tcp["open_connections"]),
                     human_bytes(tcp["bytes_in"]), human_bytes(tcp["bytes_out"])))
    return _table(WORKLOAD_HEADER, rows) if rows else ["No traffic in the window."]


def route_lines(document: dict[str, Any]) -> list[str]:
    rows = []
    for r in document.get("routes", []):
        latency = r["latency_ms"]
        rows.append((r["namespace"], r["service"].split("/", 1)[-1], r["route"],
                     str(r["requests"]), _percent(r["success_rate"]),
                     _rps(r["rps"], r["requests"]), _ms(latency["p50"]), _ms(latency["p95"]),
                     _ms(latency["p99"])))
    return _table(ROUTE_HEADER, rows) if rows else ["No HTTP requests in the window."]


def render(document: dict[str, Any], by: str) -> str:
    """The tables --by asks for, each under a title line."""
    parts = []
    window = document.get("window_seconds")
    if by in ("all", "workload"):
        parts.append("\n".join([f"WORKLOADS (node {document.get('node', '?')}, "
                                f"last {window}s)", *workload_lines(document)]))
    if by in ("all", "route"):
        parts.append("\n".join([f"ROUTES (last {window}s)", *route_lines(document)]))
    return "\n\n".join(parts)
