"""Run a 2-node simulated cluster with the mesh and show live per-workload traffic.

Builds two nodes (network namespaces wired by the real CNI plugins), six pods
and two services on this machine and starts one nodeproxy daemon per node.
Service web is nginx (VIP port 80, pods listen on 8080) with pods web-0 on
node0 and web-1 on node1; service echo is the testbed peer server (port 7000)
with pods echo-0 and echo-1.  Clients client-0 (node0) and client-1 (node1)
run bounded load against both VIPs, IPv4 and IPv6, so each service sees
same-node and cross-node traffic.  A table of the daemons' per-workload
metrics is refreshed every second.  Everything is torn down at the end, on
error and on Ctrl-C.  Needs root.  Exits non-zero when a service saw no
successful request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

WEB_PORT, WEB_TARGET, ECHO_PORT = 80, 8080, 7000
PODS = (  # node, name, app
    ("node0", "web-0", "web"),
    ("node1", "web-1", "web"),
    ("node0", "echo-0", "echo"),
    ("node1", "echo-1", "echo"),
    ("node0", "client-0", "client"),
    ("node1", "client-1", "client"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of client load (default 20)")
    parser.add_argument("--rate", type=float, default=10.0,
                        help="requests/s of each client to each service (default 10)")
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary at the end (the live table "
                             "then goes to stderr)")
    parser.add_argument("--no-mesh", action="store_true",
                        help="baseline: no daemons, clients connect to the backend pod IPs")
    parser.add_argument("--startup-timeout", type=float, default=180.0,
                        help="seconds to wait for each daemon's /ready (default 180)")


# ---------------------------------------------------------------------------
# Metrics


@dataclass
class WorkloadFigures:
    captured: float = 0.0
    opened: dict[str, float] = field(default_factory=dict)
    closed: dict[str, float] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    rtt_sum_us: float = 0.0
    rtt_count: float = 0.0

    @property
    def rtt_avg_us(self) -> float | None:
        return self.rtt_sum_us / self.rtt_count if self.rtt_count else None

    def as_dict(self) -> dict[str, Any]:
        avg = self.rtt_avg_us
        return {
            "connections_captured": int(self.captured),
            "connections_opened": {k: int(v) for k, v in self.opened.items()},
            "connections_closed": {k: int(v) for k, v in self.closed.items()},
            "bytes_sent": {k: int(v) for k, v in self.sent.items()},
            "bytes_received": {k: int(v) for k, v in self.received.items()},
            "rtt_avg_us": round(avg, 1) if avg is not None else None,
        }


@dataclass
class ServiceFigures:
    opened: float = 0.0
    closed: float = 0.0
    sent: float = 0.0
    received: float = 0.0
    requests: float = 0.0  # HTTP requests (istio_requests_total): the port speaks HTTP


_KERNEL = "nodeproxy_kernel_"
_DIRECTIONAL = {
    _KERNEL + "tcp_connections_opened_total": "opened",
    _KERNEL + "tcp_connections_closed_total": "closed",
    _KERNEL + "tcp_sent_bytes_total": "sent",
    _KERNEL + "tcp_received_bytes_total": "received",
}
_ISTIO = {
    "istio_tcp_connections_opened_total": "opened",
    "istio_tcp_connections_closed_total": "closed",
    "istio_tcp_sent_bytes_total": "sent",
    "istio_tcp_received_bytes_total": "received",
}
_RTT_SCALE = {  # summary name prefix -> factor to microseconds
    _KERNEL + "tcp_smoothed_rtt_microseconds": 1.0,
    _KERNEL + "tcp_smoothed_rtt_seconds": 1e6,
}


def parse_metrics(texts: Iterable[str]) -> tuple[dict[str, WorkloadFigures],
                                                 dict[str, ServiceFigures]]:
    """Per-workload kernel figures and per-service Istio TCP figures from /metrics texts."""
    from prometheus_client.parser import text_string_to_metric_families

    workloads: dict[str, WorkloadFigures] = {}
    by_reporter: dict[str, dict[str, ServiceFigures]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name.startswith(_KERNEL) and "pod_name" in labels:
                    key = f"{labels.get('pod_namespace', 'default')}/{labels['pod_name']}"
                    w = workloads.setdefault(key, WorkloadFigures())
                    if name == _KERNEL + "connections_captured_total":
                        w.captured += value
                    elif name in _DIRECTIONAL:
                        bucket: dict[str, float] = getattr(w, _DIRECTIONAL[name])
                        direction = labels.get("direction", "all")
                        bucket[direction] = bucket.get(direction, 0.0) + value
                    else:
                        for prefix, scale in _RTT_SCALE.items():
                            if name == prefix + "_sum":
                                w.rtt_sum_us += value * scale
                            elif name == prefix + "_count":
                                w.rtt_count += value
                elif name in _ISTIO or name == "istio_requests_total":
                    service = labels.get("destination_service", "unknown")
                    reporter = labels.get("reporter", "")
                    s = by_reporter.setdefault(reporter, {}).setdefault(service,
                                                                        ServiceFigures())
                    field = _ISTIO.get(name, "requests")
                    setattr(s, field, getattr(s, field) + value)
    # One proxy reports both ends of a same-node connection: prefer the source's view.
    services = by_reporter.get("source") or next(iter(by_reporter.values()), {})
    return workloads, services


# ---------------------------------------------------------------------------
# Client processes


class ClientRun:
    """One `peer load` process in a client pod; its JSON lines are read on a thread."""

    def __init__(self, pod: str, service: str, proc: subprocess.Popen[str]):
        self.pod, self.service, self.proc = pod, service, proc
        self.latest: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("progress"):
                self.latest = obj
            else:
                self.final = self.latest = obj

    def done(self) -> bool:
        return self.proc.poll() is not None

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# ---------------------------------------------------------------------------
# Rendering


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def render(elapsed: float, duration: float, mesh: bool, pods: dict[str, str],
           workloads: dict[str, WorkloadFigures], services: dict[str, ServiceFigures],
           clients: list[ClientRun], notes: list[str]) -> str:
    lines = [f"nodeproxy demo: 2 nodes, {len(pods)} pods, 2 services, "
             f"{'mesh' if mesh else 'NO MESH (baseline)'}, t={elapsed:.0f}s/{duration:.0f}s", ""]
    header = (f"{'WORKLOAD':<20} {'NODE':<6} {'CAPTURED':>8} {'OPEN out/in':>12} "
              f"{'CLOSED':>7} {'SENT':>10} {'RECEIVED':>10} {'RTT us':>8}")
    lines += [header, "-" * len(header)]
    for key, node in sorted(pods.items()):
        w = workloads.get(key, WorkloadFigures())
        opened = f"{w.opened.get('outbound', 0):.0f}/{w.opened.get('inbound', 0):.0f}"
        avg = w.rtt_avg_us
        lines.append(f"{key:<20} {node:<6} {w.captured:>8.0f} {opened:>12} "
                     f"{sum(w.closed.values()):>7.0f} {_human(sum(w.sent.values())):>10} "
                     f"{_human(sum(w.received.values())):>10} "
                     f"{(f'{avg:.0f}' if avg is not None else '-'):>8}")
    lines.append("")
    header = (f"{'SERVICE':<14} {'CLIENT OK':>9} {'FAILED':>7} {'p50 ms':>7} "
              f"{'MESH CONNS':>10} {'MESH REQS':>9} {'MESH SENT':>10} {'MESH RECV':>10}")
    lines += [header, "-" * len(header)]
    for service in ("default/web", "default/echo"):
        runs = [c for c in clients if c.service == service]
        ok = sum(c.latest.get("succeeded", 0) for c in runs)
        failed = sum(c.latest.get("failed", 0) for c in runs)
        p50s = [c.latest["latency_ms"]["p50"] for c in runs if c.latest.get("latency_ms")]
        p50 = f"{sum(p50s) / len(p50s):.2f}" if p50s else "-"
        s = next((v for k, v in services.items() if k.startswith(service.split("/")[1] + ".")
                  or k == service), ServiceFigures())
        lines.append(f"{service:<14} {ok:>9} {failed:>7} {p50:>7} {s.opened:>10.0f} "
                     f"{s.requests:>9.0f} {_human(s.sent):>10} {_human(s.received):>10}")
    errors: dict[str, int] = {}
    for c in clients:
        for message, count in c.latest.get("errors", {}).items():
            errors[message] = errors.get(message, 0) + count
    if errors:
        lines += ["", "client errors:"]
        lines += [f"  {count:>5} x {message}" for message, count in
                  sorted(errors.items(), key=lambda kv: -kv[1])[:5]]
    if notes:
        lines += [""] + notes[-3:]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The demo


def _start_servers(cluster: Any) -> None:
    from nodeproxy_dev.testbed import netns
    from nodeproxy_dev.testbed.nginx import nginx_config

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for node, name, app in PODS:
        pod = cluster.pods[name]
        if app == "web":
            directory = os.path.join(cluster.dir, name)
            os.makedirs(directory, exist_ok=True)
            conf = os.path.join(directory, "nginx.conf")
            Path(conf).write_text(nginx_config(
                directory, WEB_TARGET,
                f'location / {{ return 200 "web from {name} on {node}\\n"; }}',
                http="    default_type text/plain;"))
            log = open(os.path.join(directory, "stderr.log"), "wb")  # noqa: SIM115
            cluster.spawn_in_pod(pod, [nginx, "-p", directory, "-c", conf,
                                       "-e", os.path.join(directory, "error.log")],
                                 stdout=log, stderr=subprocess.STDOUT)
            log.close()
            netns.wait_for_listener(pod.netns_path, WEB_TARGET, 15.0)
        elif app == "echo":
            cluster.serve_peer(pod, ECHO_PORT, timeout=15.0)


def _start_clients(cluster: Any, args: argparse.Namespace) -> list[ClientRun]:
    web, echo = cluster.services["default/web"], cluster.services["default/echo"]
    if args.no_mesh:
        backends = {
            "default/web": [f"{p.ip4}:{WEB_TARGET}" for p in cluster.pods.values()
                            if p.labels.get("app") == "web"]
            + [f"[{p.ip6}]:{WEB_TARGET}" for p in cluster.pods.values()
               if p.labels.get("app") == "web"],
            "default/echo": [f"{p.ip4}:{ECHO_PORT}" for p in cluster.pods.values()
                             if p.labels.get("app") == "echo"]
            + [f"[{p.ip6}]:{ECHO_PORT}" for p in cluster.pods.values()
               if p.labels.get("app") == "echo"],
        }
    else:
        backends = {"default/web": [web.address(4), web.address(6)],
                    "default/echo": [echo.address(4), echo.address(6)]}
    common = ["--duration", str(args.duration), "--rate", str(args.rate), "--progress", "1",
              "--timeout", "5", "--concurrency", "8"]
    runs = []
    for _node, name, app in PODS:
        if app != "client":
            continue
        for service, mode in (("default/web", ["--mode", "http"]),
                              ("default/echo", ["--mode", "transfer", "--send", "16k",
                                                "--receive", "64k"])):
            targets = [arg for t in backends[service] for arg in ("--to", t)]
            stderr = open(os.path.join(cluster.dir, f"{name}-{service.split('/')[1]}.log"),  # noqa: SIM115
                          "wb")
            proc = cluster.spawn_in_pod(name, cluster.peer_argv("load", *mode, *targets,
                                                                *common),
                                        stdout=subprocess.PIPE, stderr=stderr, text=True)
            stderr.close()
            runs.append(ClientRun(name, service, proc))
    return runs


def _scrape(cluster: Any, notes: list[str]) -> list[str]:
    texts = []
    for node in cluster.nodes:
        try:
            texts.append(cluster.metrics(node, timeout=2.0))
        except Exception as e:  # a daemon that stops answering is shown, not fatal
            notes.append(f"{node}: metrics unavailable: {e}")
    return texts


def _show(text: str, out: IO[str], tty: bool) -> None:
    if tty:
        out.write("\x1b[H\x1b[2J" + text + "\n")
    else:
        out.write(text + "\n\n")
    out.flush()


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("nodeproxy demo: needs root (network namespaces, cgroups, eBPF)", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.duration > 3600:
        print("nodeproxy demo: --duration must be in (0, 3600]", file=sys.stderr)
        return 2
    from nodeproxy_dev.testbed.cluster import Cluster, DaemonError

    out = sys.stderr if args.json else sys.stdout
    tty = out.isatty()
    summary: dict[str, Any] = {"ok": False, "mesh": not args.no_mesh, "errors": []}
    notes: list[str] = []
    clients: list[ClientRun] = []
    workloads: dict[str, WorkloadFigures] = {}
    services: dict[str, ServiceFigures] = {}
    t_start = time.monotonic()
    with Cluster(nodes=2) as cluster:
        for node, name, app in PODS:
            cluster.add_pod(node, name, labels={"app": app}, service_account=app)
        cluster.add_service("web", port=WEB_PORT, target_port=WEB_TARGET)
        cluster.add_service("echo", port=ECHO_PORT)
        cluster.write_configs()
        summary["build_s"] = round(time.monotonic() - t_start, 3)
        if not args.no_mesh:
            print(f"starting daemons (config in {cluster.dir}) ...", file=out, flush=True)
            try:
                cluster.start_daemons(timeout=args.startup_timeout)
            except DaemonError as e:
                summary["errors"].append(str(e))
                print(f"nodeproxy demo: {e}", file=sys.stderr)
                if args.json:
                    print(json.dumps(summary, indent=2))
                return 1
            summary["daemons_ready_s"] = round(cluster.timings.get("daemons_ready_s", 0.0), 3)
        _start_servers(cluster)
        clients = _start_clients(cluster, args)
        pods = {p.key: p.node for p in cluster.pods.values()}
        load_start = time.monotonic()
        deadline = load_start + args.duration + 15
        mesh = not args.no_mesh
        while True:
            now = time.monotonic()
            if mesh:
                workloads, services = parse_metrics(_scrape(cluster, notes))
            finished = all(c.done() for c in clients)
            if not finished and (tty or int(now - load_start) % 5 == 0):
                _show(render(min(now - load_start, args.duration), args.duration, mesh, pods,
                             workloads, services, clients, notes), out, tty)
            if finished or now > deadline:
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        for c in clients:
            if not c.done():
                c.proc.kill()
            c.proc.wait()
            c.join(2.0)
        if mesh:
            workloads, services = parse_metrics(_scrape(cluster, notes))
            codes = cluster.stop_daemons()
            summary["daemons"] = {node: {"exit_code": code} for node, code in codes.items()}
        _show(render(args.duration, args.duration, mesh, pods, workloads, services, clients,
                     notes), out, False)
        summary["workloads"] = {key: {"node": pods[key], **workloads.get(
            key, WorkloadFigures()).as_dict()} for key in sorted(pods)}
    summary["timings"] = {k: round(v, 3) for k, v in cluster.timings.items()}
    summary["services"] = _service_summary(clients, services)
    failing = [s for s, v in summary["services"].items() if v["requests_ok"] == 0]
    if failing:
        summary["errors"].append(f"no successful traffic to {', '.join(failing)}")
    daemon_codes = [d["exit_code"] for d in summary.get("daemons", {}).values()]
    if any(code != 0 for code in daemon_codes):
        summary["errors"].append(f"daemon exit codes: {daemon_codes}")
    summary["ok"] = not summary["errors"]
    summary["duration_s"] = round(time.monotonic() - t_start, 3)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for error in summary["errors"]:
            print(f"nodeproxy demo: {error}", file=sys.stderr)
    return 0 if summary["ok"] else 1


def _service_summary(clients: list[ClientRun],
                     services: dict[str, ServiceFigures]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for service in ("default/web", "default/echo"):
        runs = [c for c in clients if c.service == service]
        finals = [c.final or c.latest for c in runs]
        errors: dict[str, int] = {}
        for f in finals:
            for message, count in f.get("errors", {}).items():
                errors[message] = errors.get(message, 0) + count
        mesh = next((v for k, v in services.items()
                     if k == service or k.startswith(service.split("/")[1] + ".")), None)
        result[service] = {
            "requests_ok": sum(f.get("succeeded", 0) for f in finals),
            "requests_failed": sum(f.get("failed", 0) for f in finals),
            "bytes_sent": sum(f.get("sent", 0) for f in finals),
            "bytes_received": sum(f.get("received", 0) for f in finals),
            "latency_ms_p50": max((f.get("latency_ms", {}).get("p50", 0.0) for f in finals),
                                  default=0.0),
            "errors": errors,
            "mesh_tcp": None if mesh is None or not mesh.opened else {
                "connections_opened": int(mesh.opened), "connections_closed": int(mesh.closed),
                "bytes_sent": int(mesh.sent), "bytes_received": int(mesh.received)},
            # A port the proxy found speaking HTTP is counted per request, as Istio does.
            "mesh_http": None if mesh is None or not mesh.requests else {
                "requests": int(mesh.requests)},
            "clients": {c.pod: c.final for c in runs},
        }
    return result
