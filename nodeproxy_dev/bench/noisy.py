"""Noisy neighbour: does one hostile pod take the shared node proxy away from another?

Two phases in one run, same configuration, back to back:

1. **baseline**: the quiet pod (the configuration's HTTP client) runs wrk at ~1000 req/s
   (``wrk.fixed_rate``) to its service on the same node, alone;
2. **attack**: the same, while the enrolled pod ``attacker`` on the same node runs three
   attacks at once (``nodeproxy_dev.testbed.attack``) against its own service on the same node
   proxy (``attack-target``, appProtocol http): HTTP/2 rapid reset, a connection flood and
   slowloris.  The attacks start LEAD_S before the quiet pod's run and stop after it.

Reported: the quiet pod's success share, p99 and achieved rate in both phases (its p99
under attack as a multiple of its own baseline), the proxy's peak RSS and CPU (cores) in
each phase, and what each attack saw (GOAWAYs, connections closed by the proxy).  For
HAProxy (the reference) the unenrolled ``attacker-direct`` does the same through
HAProxy's attack frontend.  Every
load is bounded in connections, rate and time (the constants below).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from nodeproxy_dev.bench import cpulimit, haproxy, procstat, wrk
from nodeproxy_dev.bench.runner import tail
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import (
    ATTACKER_DIRECT_POD,
    ATTACKER_POD,
    HAPROXY_POD,
    BenchCluster,
)
from nodeproxy_dev.bench.vocabulary import MeasurementError, Route

# The attack, fixed so that the figures of two runs compare and the RSS bound holds.
RAPID_RESET_CONNECTIONS = 2
RAPID_RESET_RATE = 2500  # HEADERS+RST_STREAM pairs per second per connection
FLOOD_CONNECTIONS = 2000  # opened 64 at a time, held silent
SLOWLORIS_CONNECTIONS = 500
SLOWLORIS_INTERVAL_S = 1.0  # one byte of an unfinished request head per connection
HELD_CONNECTIONS = RAPID_RESET_CONNECTIONS + FLOOD_CONNECTIONS + SLOWLORIS_CONNECTIONS
# The attacker's processes share one CPU quota, as a pod's CPU limit would set it: the
# attack tools are Python and would otherwise take a core of this 2-core machine from
# every process, the quiet pod's included, whatever the proxy did.
ATTACKER_CPU_CORES = 0.5
LEAD_S = 2.0  # the attacks run this long before the quiet pod's run starts
TAIL_S = 1.0  # ... and at least this long after it ends
ATTACK_GRACE_S = 15.0  # the attack tool's own bound past its duration, and some
RSS_SAMPLE_S = 0.2
# The quiet pod's deadline per request (wrk --timeout): a request its service answers in
# about a millisecond, not answered within a second, is a failure to its user.  wrk counts
# a response later than this as a timeout (and leaves it out of the percentiles).
QUIET_TIMEOUT_S = 1.0
# Before each phase alone and after the attack: wait (at most SETTLE_MAX_S) until the
# proxy is idle, below SETTLE_CORES over a SETTLE_WINDOW_S window, so a baseline does not
# carry the end of a previous attack.
SETTLE_CORES = 0.1
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 15.0

# The daemon's memory under attack may grow by what the attacker *holds* (its
# connections) but not with what it *sends* (cancelled streams, requests never finished,
# upstream connections opened for them): at most RSS_PER_HELD_KIB per held connection
# (the idle-connection scenario measures about 4.5 KiB per relayed connection on this
# machine; 16 KiB leaves room for a parser buffer and HTTP/2 state per connection) plus
# RSS_MARGIN_MIB for the allocator's slack and the quiet pod's own traffic.
RSS_PER_HELD_KIB = 16
RSS_MARGIN_MIB = 16


def rss_growth_bound_mib() -> float:
    """How much the daemon's peak RSS may grow from the baseline phase to the attack."""
    return HELD_CONNECTIONS * RSS_PER_HELD_KIB / 1024 + RSS_MARGIN_MIB


@dataclass(frozen=True)
class AttackTarget:
    """Where the attacks come from and go: a pod and the address it attacks."""

    pod: str
    host: str
    port: int


def attack_target(bench: BenchCluster, meshed: bool) -> AttackTarget:
    """For nodeproxy (``meshed``): the enrolled ``attacker`` against the VIP of
    ``attack-target``, through node0's daemon.  For HAProxy: ``attacker-direct`` against
    HAProxy's attack frontend.  Both reach a second nginx, not the quiet pod's."""
    service = bench.ensure_attacker()
    if meshed:
        assert service.vip4 is not None
        return AttackTarget(ATTACKER_POD, service.vip4, service.port)
    return AttackTarget(ATTACKER_DIRECT_POD, bench.pod(HAPROXY_POD).ip4, haproxy.ATTACK_PORT)


@dataclass(frozen=True)
class AttackRun:
    """One attack of the three: its kind and the attack tool's options."""

    kind: str
    options: tuple[str, ...]


def attacks(seconds: float) -> list[AttackRun]:
    """The three attacks, each for ``seconds``, each reconnecting what the proxy closes."""
    # --reconnect: a slot the proxy closes (a GOAWAY, a timeout, a cap) is opened again.
    duration = ("--duration", f"{seconds:g}", "--reconnect")
    return [
        AttackRun("rapid-reset", (*duration, "--connections", str(RAPID_RESET_CONNECTIONS),
                                  "--rate", str(RAPID_RESET_RATE))),
        AttackRun("flood", (*duration, "--connections", str(FLOOD_CONNECTIONS))),
        AttackRun("slowloris", (*duration, "--connections", str(SLOWLORIS_CONNECTIONS),
                                "--interval", f"{SLOWLORIS_INTERVAL_S:g}")),
    ]


def attack_argv(python: str, run: AttackRun, host: str, port: int) -> list[str]:
    return [python, "-m", "nodeproxy_dev.testbed.attack", run.kind, "--host", host,
            "--port", str(port), *run.options, "--json"]


def success_percent(result: dict[str, float]) -> float:
    """The share of the quiet pod's requests answered in time with a status below 400, in
    percent.  wrk (4.1) counts in ``requests`` every response that arrived, late ones
    included, and counts a response later than ``--timeout`` as a timeout (and leaves its
    latency out of the percentiles); a connect, read or write error loses a request that
    is in no other count.  A request still unanswered when the run ends is in none: see
    the achieved rate and ``measure``'s rule for a run that completed nothing."""
    requests = result["requests"]
    lost = sum(result[f] for f in ("connect_errors", "read_errors", "write_errors"))
    attempted = requests + lost
    if attempted <= 0:
        return 0.0
    good = max(0.0, requests - result["status_errors"] - result["timeouts"])
    return 100.0 * good / attempted


def settle(pid: int) -> float:
    """Seconds until the process used less than SETTLE_CORES over a SETTLE_WINDOW_S
    window (SETTLE_MAX_S at most, then the caller goes on regardless)."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_MAX_S:
        before = procstat.cpu_seconds(pid)
        time.sleep(SETTLE_WINDOW_S)
        if procstat.cpu_seconds(pid) - before < SETTLE_CORES * SETTLE_WINDOW_S:
            break
    return time.monotonic() - started


class PeakRss(threading.Thread):
    """Samples a process's RSS every RSS_SAMPLE_S until stopped; keeps the peak (KiB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, procstat.rss_kib(self.pid))
                self.samples += 1
            except OSError:
                return
            if self._stop_event.wait(RSS_SAMPLE_S):
                return

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


def _quiet_run(bench: BenchCluster, route: Route, settings: Settings,
               pid: int) -> dict[str, Any]:
    """The quiet pod's wrk at ~1000 req/s, errors reported rather than fatal (a run that
    completed no request at all is 0 % success, with wrk's complaint), with the proxy's
    CPU (cores) and peak RSS over it."""
    sampler = PeakRss(pid)
    sampler.start()
    cpu_before, started = procstat.cpu_seconds(pid), time.monotonic()
    try:
        result: dict[str, Any] = dict(wrk.fixed_rate(bench, route, settings,
                                                     seconds=settings.noisy_seconds,
                                                     max_error_share=1.0,
                                                     timeout_s=QUIET_TIMEOUT_S))
        result["success_percent"] = success_percent(result)
    except MeasurementError as e:
        # No request answered in the whole run: every latency was at least the run's.
        result = {"success_percent": 0.0, "error": str(e), "rps": 0.0,
                  "p99_ms": settings.noisy_seconds * 1000,
                  "max_ms": settings.noisy_seconds * 1000, "p99_is_lower_bound": True}
    finally:
        peak = sampler.stop()
    wall = time.monotonic() - started
    result.update({
                   "proxy_cores": (procstat.cpu_seconds(pid) - cpu_before) / wall,
                   "proxy_rss_peak_mib": peak / 1024, "rss_samples": sampler.samples})
    return result


def measure(bench: BenchCluster, route: Route, settings: Settings,
            meshed: bool) -> dict[str, Any]:
    """Both phases; the first proxy on the quiet pod's route is the one whose CPU and
    memory are reported (node0's daemon, or HAProxy).  Raises MeasurementError if the
    quiet pod got no answer alone or an attack tool did not report."""
    if not route.proxies:
        raise MeasurementError("no proxy on the route: nothing to share")
    target = attack_target(bench, meshed)
    proxy = route.proxies[0]
    pid = proxy.pid
    out: dict[str, Any] = {"proxy": proxy.name, "attacker": target.pod,
                           "attack_target": f"{target.host}:{target.port}",
                           "settle_before_s": settle(pid),
                           "rss_idle_mib": procstat.rss_kib(pid) / 1024}
    out["baseline"] = _quiet_run(bench, route, settings, pid)
    seconds = LEAD_S + settings.noisy_seconds + TAIL_S
    c = bench.cluster
    procs: dict[str, subprocess.Popen[str]] = {}
    with cpulimit.CpuLimit(f"{c.run_id}-{target.pod}", ATTACKER_CPU_CORES) as limit:
        out["attacker_cpu_limit"] = ATTACKER_CPU_CORES if limit.active else limit.reason
        try:
            for run in attacks(seconds):
                argv = limit.wrap(attack_argv(c.python, run, target.host, target.port))
                procs[run.kind] = c.spawn_in_pod(target.pod, argv, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)
            time.sleep(LEAD_S)
            out["attack"] = _quiet_run(bench, route, settings, pid)
            out["attacks"] = {kind: _attack_report(kind, proc, seconds)
                              for kind, proc in procs.items()}
            out["attacker_cpu_stat"] = limit.stat()
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
                pod_procs = c.pods[target.pod].processes
                if proc in pod_procs:
                    pod_procs.remove(proc)
    try:  # what stays after the attacker has gone
        out["busy_after_s"] = settle(pid)
        out["rss_after_mib"] = procstat.rss_kib(pid) / 1024
    except OSError as e:
        raise MeasurementError(f"{proxy.name} did not survive the attack") from e
    if meshed:
        out["ready_after"] = c.ready("node0")
    baseline, attack = out["baseline"], out["attack"]
    if baseline.get("p99_is_lower_bound"):
        raise MeasurementError("the quiet pod's baseline run got no answer: "
                               f"{baseline.get('error', '')}")
    if baseline["p99_ms"] > 0:
        out["p99_ratio"] = attack["p99_ms"] / baseline["p99_ms"]
    out["rss_growth_mib"] = attack["proxy_rss_peak_mib"] - baseline["proxy_rss_peak_mib"]
    return out


def _attack_report(kind: str, proc: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=seconds + ATTACK_GRACE_S)
    except subprocess.TimeoutExpired as e:
        raise MeasurementError(f"attack {kind} did not stop within its bound") from e
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            report: dict[str, Any] = json.loads(line)
            return report
    raise MeasurementError(f"attack {kind} printed no report (exit {proc.returncode}): "
                           f"{tail(stderr or stdout)}")
