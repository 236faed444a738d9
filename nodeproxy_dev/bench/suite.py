"""One benchmark run: build the cluster once, alternate the configurations over the rounds.

Every round runs every per-round scenario, and within a scenario every
configuration one after the other (A B C, A B C, ...), so slow drifts of the
machine (thermal, other load, page cache) spread over all configurations
instead of favouring the one measured first or last.  Configurations that need
the daemons set up differently in a section only a restart changes (``daemon_overrides``
in a RESTART_ONLY section, e.g. iptables capture) cost a daemon restart (~3 s) to
switch to: each such setting is measured as a block of the
round (every scenario, its configurations one after the other), and the blocks swap
order every other round, so the daemons restart about once per round and no block
is always first.  ``direct`` and ``haproxy`` ride with the first block, and ``direct``
is measured again in each other block, so every ratio to it pairs figures taken
minutes apart at most, not a block apart.  The scale
scenarios (idle connections, enrollment) run once, after the rounds: they leave
state behind (extra pods) that the other figures must not see.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nodeproxy.config.changes import RESTART_ONLY
from nodeproxy.config.model import LimitSettings
from nodeproxy_dev.bench import procstat, report, scenarios, stats, targets
from nodeproxy_dev.bench.configurations import CONFIGURATIONS, Configuration, available
from nodeproxy_dev.bench.report import BASELINE
from nodeproxy_dev.bench.scenarios import Scenario
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.topology import BenchCluster
from nodeproxy_dev.bench.vocabulary import Cell, MeasurementError
from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster

Log = Callable[[str], None]
# Descriptors a daemon needs besides two per proxied connection: the ones proxied sockets
# never take (limits.reservedFiles, nodeproxy.tcp.descriptors) and its own (BPF programs
# and maps, per-pod listeners, admin).  With less, the last connections of the idle
# scenario are refused by the proxy's own budget, not held.
FD_MARGIN = LimitSettings().reserved_files + 1000


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def select(chosen: list[Scenario], only: str | None) -> list[Scenario]:
    """The scenarios --only picks, in their own order.  `only` is one text or several,
    comma-separated; each picks the scenario named exactly that if there is one (so
    "connect same-node" leaves out "sustained connect same-node"), else every one whose
    name contains it."""
    if only is None:
        return chosen
    picked: set[str] = set()
    for part in only.split(","):
        exact = [s.name for s in chosen if s.name == part]
        picked.update(exact or [s.name for s in chosen if part in s.name])
    return [s for s in chosen if s.name in picked]


class Suite:
    """The state of one run: results per metric and configuration, the run log, errors."""

    def __init__(self, settings: Settings, configurations: list[Configuration] | None = None,
                 log: Log = stderr_log, startup_timeout: float = 120.0,
                 only: str | None = None):
        self.notes: list[str] = []
        self.settings = self._fit_nofile(settings)
        self.configurations = list(configurations or CONFIGURATIONS)
        self.runnable = available(self.configurations)
        self.scenarios = select(scenarios.build(self.settings), only)
        self.log = log
        self.startup_timeout = startup_timeout
        self.results: dict[str, dict[str, Cell]] = {}
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.timings: dict[str, float] = {}
        self.run_id = ""
        self.process_ids: list[int] = []
        self._t0 = time.monotonic()
        for scenario in self.scenarios:
            for metric in (*scenario.metrics, *(a.metric for a in scenario.added)):
                self.results[metric.key] = {
                    c.name: Cell(not_applicable=metric.not_applicable(c.name, c.has_proxy,
                                                                      c.http_only))
                    for c in self.runnable}

    def _fit_nofile(self, settings: Settings) -> Settings:
        """Lift this process's open-file limit (the daemons, servers and clients inherit it)
        and hold no more idle connections than a proxy can with it."""
        soft, hard = procstat.lift_own_nofile(2 * settings.idle_connections + FD_MARGIN)
        self.notes.append(f"open-file limit of every process of the run: {soft} (hard {hard})")
        fit = (soft - FD_MARGIN) // 2
        if fit < settings.idle_connections:
            self.notes.append(
                f"idle connections reduced from {settings.idle_connections} to {fit}: a proxy "
                f"needs two descriptors per connection and the open-file hard limit is {hard} "
                "(raising it needs CAP_SYS_RESOURCE)")
            settings = replace(settings, idle_connections=fit)
        return settings

    # -- running --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Everything, cluster set-up and teardown included; returns the JSON document."""
        started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        machine = procstat.machine(REPO_ROOT)
        # iptables capture needs the VIPs routed out of the pods (see Cluster).
        routed = any(c.uses_mesh and c.capture_mode == "iptables" for c in self.runnable)
        cluster = Cluster(nodes=2, mtls=True, pod_vip_unreachable=not routed)
        self.run_id = cluster.run_id
        try:
            with cluster:
                self._run_on(cluster)
        except Exception as e:  # the testbed itself failed: reported like any missing figure
            self._fail(f"cluster failed: {type(e).__name__}: {e}")
        self.timings.update({f"cluster_{k}": v for k, v in cluster.timings.items()})
        self.errors += [f"teardown: {problem}" for problem in cluster.teardown_errors]
        return self.document(started_at, machine)

    def _run_on(self, cluster: Cluster) -> None:
        bench = BenchCluster(cluster, self.settings, self.startup_timeout)
        t = time.monotonic()
        try:
            bench.build()
        except Exception as e:  # reported; every figure then says why it is missing
            self._fail(f"cluster set-up failed: {type(e).__name__}: {e}")
            for node, text in bench.daemon_logs().items():
                self.notes.append(f"{node} daemon log tail: {text[-1500:]}")
        else:
            self.timings["setup_s"] = time.monotonic() - t
            self.log(f"[{self._elapsed()}] cluster ready in {self.timings['setup_s']:.1f}s "
                     f"(dir {cluster.dir})")
            self._measure_all(bench)
        self.process_ids = bench.process_ids()

    def blocks(self, round_number: int) -> list[list[Configuration]]:
        """The runnable configurations grouped by the restart-only daemon settings they
        need (sections a hot reload cannot change), in list order, the configurations that
        do not use the mesh with the first group; the groups in reverse on even rounds."""
        groups: dict[str, list[Configuration]] = {}
        for c in self.runnable:
            restart = {k: v for k, v in c.daemon_overrides().items() if k in RESTART_ONLY}
            key = json.dumps(restart, sort_keys=True) if c.uses_mesh else ""
            groups.setdefault(key, []).append(c)
        riders = groups.pop("", [])
        blocks = list(groups.values()) or [[]]
        blocks[0] = sorted(riders + blocks[0], key=self.runnable.index)
        baseline = [c for c in riders if c.name == BASELINE]
        blocks[1:] = [baseline + block for block in blocks[1:]]
        return blocks[::-1] if round_number % 2 == 0 else blocks

    def _measure_all(self, bench: BenchCluster) -> None:
        per_round = [s for s in self.scenarios if not s.once]
        for round_number in range(1, self.settings.rounds + 1):
            for index, block in enumerate(self.blocks(round_number)):
                for scenario in per_round:
                    for configuration in block:
                        if scenario.applies(configuration):
                            self._measure(bench, scenario, configuration, round_number, index)
        # Once-scenarios: starting with the daemons' setting of the last block measured,
        # each configuration once.
        after = [c for block in self.blocks(self.settings.rounds + 1) for c in block]
        for scenario in (s for s in self.scenarios if s.once):
            for configuration in dict.fromkeys(after):
                if scenario.applies(configuration):
                    self._measure(bench, scenario, configuration, 0)
        self._derive()

    def _derive(self) -> None:
        """The scenarios' added figures: each sample minus direct's of the same round and
        block (a configuration without its own sample has none, with the reason)."""
        for scenario in self.scenarios:
            for added in scenario.added:
                measured = self.results[added.of]
                baseline = measured.get(BASELINE)
                for name, cell in self.results[added.metric.key].items():
                    if cell.not_applicable:
                        continue
                    source = measured[name]
                    if baseline is None or not baseline.samples:
                        cell.errors.append(f"{BASELINE} has no {added.of} figure to subtract")
                        continue
                    derived = stats.paired_differences(source, baseline)
                    for value, r, block in zip(derived.samples, derived.rounds,
                                               derived.blocks, strict=True):
                        cell.add(value, r, block)
                    cell.errors += derived.errors + source.errors

    def _measure(self, bench: BenchCluster, scenario: Scenario, configuration: Configuration,
                 round_number: int, block: int = 0) -> None:
        t = time.monotonic()
        values: dict[str, float] = {}
        raw: dict[str, Any] = {}
        error: str | None = None
        try:
            configuration.prepare(bench)
            values, raw = scenario.measure(bench, configuration, self.settings)
        except MeasurementError as e:
            error = str(e)
        except Exception as e:  # a crashed daemon, a missing tool: reported per figure
            error = f"{type(e).__name__}: {e}"
        for metric in scenario.metrics:
            cell = self.results[metric.key][configuration.name]
            if cell.not_applicable:
                continue
            if metric.key in values:
                cell.add(values[metric.key], round_number, block)
            else:
                cell.errors.append(error or "the run produced no value for it")
        seconds = time.monotonic() - t
        if raw.get("note"):
            self.notes.append(f"{scenario.name}, {configuration.name}: {raw['note']}")
        self.runs.append({"round": round_number, "block": block, "scenario": scenario.name,
                          "configuration": configuration.name, "seconds": round(seconds, 3),
                          "values": values, "raw": raw, "error": error})
        where = f"round {round_number}/{self.settings.rounds}" if round_number else "once"
        shown = ", ".join(f"{k.split('.', 2)[-1]}={v:.4g}" for k, v in values.items())
        self.log(f"[{self._elapsed()}] {where} {scenario.name} {configuration.name}: "
                 f"{shown or 'FAILED: ' + str(error)} ({seconds:.1f}s)")

    def _fail(self, reason: str) -> None:
        """A failure that leaves every figure still unmeasured without one."""
        self.errors.append(reason)
        for cells in self.results.values():
            for cell in cells.values():
                if not cell.not_applicable and not cell.samples:
                    cell.errors.append(reason)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._t0:6.1f}s"

    # -- the document ---------------------------------------------------------

    def document(self, started_at: str, machine: dict[str, Any]) -> dict[str, Any]:
        metrics = [report.metric_entry(metric, scenario.name, scenario.once,
                                       self.results[metric.key], self.configurations)
                   for scenario in self.scenarios
                   for metric in (*scenario.metrics, *(a.metric for a in scenario.added))]
        missing = report.missing(metrics)
        return {
            "schema": report.SCHEMA,
            "ok": not missing and not self.errors,
            "started_at": started_at,
            "duration_s": round(time.monotonic() - self._t0, 1),
            "machine": machine,
            "machine_line": procstat.machine_line(machine),
            "settings": self.settings.as_dict(),
            "configurations": [c.describe() for c in self.configurations],
            "order": [c.name for c in self.runnable],
            "blocks": [[c.name for c in block] for block in self.blocks(1)],
            "metrics": metrics,
            "targets": targets.evaluate(metrics),
            "missing": missing,
            "runs": self.runs,
            "errors": self.errors,
            "notes": self.notes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "run_id": self.run_id,
            "process_ids": self.process_ids,
        }
