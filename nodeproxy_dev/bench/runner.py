"""Running one bounded tool invocation inside a pod, and reading its JSON output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError


def run_tool(bench: BenchCluster, pod: str, argv: Sequence[str],
             timeout: float) -> subprocess.CompletedProcess[str]:
    """Run argv in the pod to completion; a timeout is a MeasurementError (the tool is killed)."""
    try:
        return bench.cluster.run_in_pod(pod, list(argv), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise MeasurementError(f"{argv[0]} did not finish within {timeout:.0f}s") from e
    except OSError as e:
        raise MeasurementError(f"{argv[0]} could not run: {e}") from e


def last_json_line(result: subprocess.CompletedProcess[str], tool: str) -> dict[str, Any]:
    """The last line of stdout that is a JSON object."""
    for line in reversed(result.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise MeasurementError(f"{tool} printed no result (exit {result.returncode}): "
                           f"{tail(result.stderr or result.stdout)}")


def tail(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]
