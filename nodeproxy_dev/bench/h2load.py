"""L7 over HTTP/2: h2load (nghttp2) against nginx, prior knowledge (h2c), at saturation.

A bounded number of requests over ``h2_connections`` connections with ``h2_streams``
streams in flight on each.  Every request must succeed with a 2xx and carry the whole
file (h2load's DATA bytes = requests × the file's size): a request that fails, or one
answer short or long, fails the run.  The latency percentiles come from h2load's
per-request log (``--log-file``: start, status, µs to the end of the response), the rate
from its wall time.  Before the load, one request by curl (HTTP/2 prior knowledge)
compares the bytes themselves with the file served (outside the measured window: it is
neither timed nor counted).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nodeproxy_dev.bench.grpcunary import percentile
from nodeproxy_dev.bench.runner import run_tool, tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import HTTP_FILE, BenchCluster
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s),", re.M)
_REQUESTS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", re.M)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_TRAFFIC = re.compile(r"^traffic: .*?, ([\d.]+\w*) \((\d+)\) data", re.M)


@dataclass(frozen=True)
class Summary:
    """What h2load's report says about one run."""

    seconds: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    data_bytes: int


def parse(stdout: str) -> Summary:
    """h2load's report; MeasurementError if a line is missing."""
    found = [p.search(stdout) for p in (_FINISHED, _REQUESTS, _STATUS, _TRAFFIC)]
    if not all(found):
        raise MeasurementError(f"h2load printed no report: {tail(stdout)}")
    finished, requests, status, traffic = found
    assert finished and requests and status and traffic
    counts = [int(v) for v in requests.groups()]
    return Summary(float(finished.group(1)) * _UNITS[finished.group(2)], *counts,
                   *(int(v) for v in status.groups()), int(traffic.group(2)))


def problem(summary: Summary, requests: int, body: int) -> str | None:
    """Why the run does not count (a request not answered 2xx with the whole file), or
    None."""
    s = summary
    if s.succeeded != requests or s.status_2xx != requests or s.failed or s.errored \
            or s.timeout:
        return (f"h2load: {s.succeeded} of {requests} requests succeeded ({s.failed} failed, "
                f"{s.errored} errored, {s.timeout} timed out; status 2xx {s.status_2xx}, "
                f"3xx {s.status_3xx}, 4xx {s.status_4xx}, 5xx {s.status_5xx})")
    if s.data_bytes != requests * body:
        return (f"h2load: {s.data_bytes} bytes of response data for {requests} answers of "
                f"{body} bytes (expected {requests * body})")
    return None


def latencies_us(log: str) -> list[float]:
    """The per-request durations (µs) of h2load's --log-file, ascending; MeasurementError
    on a line that is not start, status, duration, or a status that is not 2xx."""
    out = []
    for number, line in enumerate(log.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3 or not all(f.strip().lstrip("-").isdigit() for f in fields):
            raise MeasurementError(f"h2load log line {number} unreadable: {line[:80]!r}")
        if not 200 <= int(fields[1]) < 300:
            raise MeasurementError(f"h2load log line {number}: status {fields[1]}")
        out.append(float(fields[2]))
    return sorted(out)


def saturate(bench: BenchCluster, route: Route, settings: Settings) -> dict[str, float]:
    """requests/s, p50/p99 latency (ms) of one h2load run, every answer checked (by its
    size: ``check_bytes`` checks the bytes, once, before)."""
    url = f"http://{route.address}/{HTTP_FILE}"
    directory = os.path.join(bench.cluster.dir, "bench")
    os.makedirs(directory, exist_ok=True)
    log = os.path.join(directory, f"h2load-{route.client_pod}-{route.port}.tsv")
    requests = settings.h2_requests
    argv = ["h2load", "-t1", f"-c{settings.h2_connections}", f"-m{settings.h2_streams}",
            f"-n{requests}", f"--log-file={log}", url]
    result = run_tool(bench, route.client_pod, argv, timeout=60 + settings.tool_margin)
    if result.returncode != 0:
        raise MeasurementError(f"h2load exited {result.returncode}: "
                               f"{tail(result.stderr + result.stdout)}")
    summary = parse(result.stdout)
    why = problem(summary, requests, settings.http_body)
    if why:
        raise MeasurementError(why)
    times = latencies_us(Path(log).read_text())
    os.unlink(log)
    if len(times) != requests:
        raise MeasurementError(f"h2load logged {len(times)} requests of {requests}")
    return {"rps": requests / summary.seconds, "duration_s": summary.seconds,
            "p50_ms": percentile(times, 50) / 1000, "p99_ms": percentile(times, 99) / 1000,
            "max_ms": times[-1] / 1000, "requests": float(requests),
            "data_bytes": float(summary.data_bytes)}


def check_bytes(bench: BenchCluster, route: Route, settings: Settings) -> None:
    """One request over HTTP/2 prior knowledge: the bytes are the file's."""
    url = f"http://{route.address}/{HTTP_FILE}"
    out = os.path.join(bench.cluster.dir, "bench", f"h2-check-{route.client_pod}.bin")
    result = run_tool(bench, route.client_pod,
                      ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
                       "-o", out, "-w", "%{http_version} %{http_code}", url],
                      timeout=10 + settings.tool_margin)
    body = Path(out).read_bytes() if os.path.exists(out) else b""
    if os.path.exists(out):
        os.unlink(out)
    status = result.stdout.strip()
    if result.returncode != 0 or status != "2 200" or body != bench.http_body:
        raise MeasurementError(f"curl --http2-prior-knowledge {url}: exit "
                               f"{result.returncode}, {status!r}, {len(body)} bytes (want "
                               f"HTTP/2 200 and the {len(bench.http_body)} bytes of the file"
                               f"{'' if len(body) != len(bench.http_body) else ', not others'}"
                               f"): {tail(result.stderr)}")
