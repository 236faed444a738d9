"""A simulated cluster: N nodes, pods wired by the real CNI plugins, services, one daemon per node.

Topology (run id R, node i):

- node netns ``npt-R-<node>``: loopback, the CNI bridge ``cni0`` (gateway of the
  node's pod CIDRs 10.244.i.0/24 and fd00:10:244:i::/64, made by the bridge
  plugin on the first pod), one veth ``nt<j>`` to every other node j with
  static routes to that node's pod CIDRs, forwarding on, and the service VIP
  ranges 10.96.0.0/16 and fd00:10:96::/112 ``unreachable`` so an uncaptured
  VIP connect fails at once.  No default route: nothing leaves the machine.
- pod netns ``npt-R-<pod>``: eth0 from the CNI bridge plugin (host-local IPAM,
  dual stack, default routes to the bridge) and lo from the loopback plugin;
  the VIP ranges unreachable here too (see ``Cluster``).
- cgroups: ``<cgroup2>/npt-R/<node>`` is the node's podCgroup, pods live in
  ``<cgroup2>/npt-R/<node>/pods/<pod>``; a node's daemons run in
  ``<cgroup2>/npt-R/daemons/<node>``, outside the pod subtree (ebpf capture attaches
  its SO_ORIGINAL_DST program to the daemon's own cgroup, which must not be the
  machine's root).
- files: ``$TMPDIR/npt-R/`` holds the node YAMLs, control sockets, CNI IPAM
  state, daemon logs, and one private bpffs mount per node
  (``$TMPDIR/npt-R/<node>/bpffs``, the node's ``bpffs``), so daemons of
  concurrent runs never see each other's pins; /sys/fs/bpf is not touched.

Everything is removed by ``close()`` (also on exceptions, SIGTERM/SIGHUP and at
exit); ``sweep_leftovers()`` removes what a killed run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from nodeproxy import ports
from nodeproxy_dev.testbed import cgroups, cni, netns, nginx

PREFIX = "npt-"
VIP_RANGE4 = "10.96.0.0/16"
VIP_RANGE6 = "fd00:10:96::/112"
REPO_ROOT = str(Path(__file__).resolve().parents[2])
_RUN_ID = re.compile(r"^npt-([0-9a-f]{6})(?:-|$)")
_API_VERSION = "nodeproxy.io/v1alpha1"
_KIND = "NodeProxyConfig"


class DaemonError(RuntimeError):
    """A node daemon failed to start or to become ready."""


@dataclass
class Node:
    """A simulated node: a netns, a pod network, a cgroup subtree and maybe a daemon."""

    name: str
    index: int
    netns: str
    netns_path: str
    cgroup: str
    daemon_cgroup: str
    pod_cidrs: list[str]
    network: cni.CniNetwork
    dir: str
    bpffs: str | None
    control_socket: str
    config_path: str
    config: dict[str, Any] = field(default_factory=dict)
    daemon: subprocess.Popen[bytes] | None = None
    daemon_log: str = ""

    @property
    def gateway4(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidrs[0]).hosts()))

    @property
    def gateway6(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidrs[1]).hosts()))

    def admin_port(self) -> int:
        return int(self.config.get("admin", {}).get("adminPort", ports.ADMIN_PORT))

    def metrics_port(self) -> int:
        return int(self.config.get("admin", {}).get("metricsPort", ports.METRICS_PORT))


@dataclass
class Pod:
    """A simulated pod: a netns wired by CNI, maybe a cgroup, maybe enrolled in the mesh."""

    name: str
    namespace: str
    node: str
    service_account: str
    labels: dict[str, str]
    netns: str
    netns_path: str
    cgroup: str | None
    ips: list[str]
    enrolled: bool
    cni_result: dict[str, Any] = field(default_factory=dict)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # more workload fields (camelCase)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip4(self) -> str:
        return next(ip for ip in self.ips if ":" not in ip)

    @property
    def ip6(self) -> str:
        return next(ip for ip in self.ips if ":" in ip)

    def workload(self, for_node: str) -> dict[str, Any]:
        """This pod as a workload entry (camelCase) of ``for_node``'s YAML."""
        entry: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "labels": dict(self.labels),
            "ips": list(self.ips),
            **self.settings,
        }
        if for_node == self.node:
            entry["netns"] = self.netns_path
            entry["cgroup"] = self.cgroup
        else:
            entry["node"] = self.node
        return entry


@dataclass
class Service:
    """A service: VIPs (IPv4 and/or IPv6), one port, a label selector."""

    name: str
    namespace: str
    vips: list[str]
    port: int
    target_port: int
    selector: dict[str, str]
    app_protocol: str | None = None
    traffic_policy: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vip4(self) -> str | None:
        return next((v for v in self.vips if ":" not in v), None)

    @property
    def vip6(self) -> str | None:
        return next((v for v in self.vips if ":" in v), None)

    def address(self, family: int = 4) -> str:
        """HOST:PORT (or [IPv6]:PORT) of the VIP of that family."""
        vip = self.vip4 if family == 4 else self.vip6
        if vip is None:
            raise ValueError(f"service {self.key} has no IPv{family} VIP")
        return f"[{vip}]:{self.port}" if family == 6 else f"{vip}:{self.port}"

    def config(self) -> dict[str, Any]:
        port: dict[str, Any] = {"port": self.port, "targetPort": self.target_port,
                                "name": self.app_protocol or "tcp"}
        if self.app_protocol:
            port["appProtocol"] = self.app_protocol
        config: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "vips": list(self.vips),
            "ports": [port],
            "selector": dict(self.selector),
        }
        if self.traffic_policy:
            config["trafficPolicy"] = self.traffic_policy
        return config


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """base updated by extra, recursively for dicts (lists and scalars are replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------
# Leftovers of earlier runs


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(run_dir: str) -> bool:
    """Is the process that made this run still running (or is the run being made now)?"""
    try:
        pid_text, start = Path(run_dir, "owner").read_text().split()
    except (OSError, ValueError):
        # No owner file yet: a run that is starting this very moment, or a dead one.
        try:
            return time.time() - os.stat(run_dir).st_mtime < 30
        except OSError:
            return False
    return _start_time(int(pid_text)) == start


def _run_dirs_root() -> str:
    return tempfile.gettempdir()


def _mounts_under(directory: str) -> list[str]:
    """Mount points at or below directory, deepest first."""
    prefix = directory.rstrip("/") + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p == directory or p.startswith(prefix)),
                  key=len, reverse=True)


def _unmount_all(directory: str) -> None:
    for point in _mounts_under(directory):
        subprocess.run(["umount", "-l", point], capture_output=True, check=True)


def _remove_run_dir(directory: str) -> None:
    """Unmount the private bpffs mounts inside, then delete the directory."""
    _unmount_all(directory)
    shutil.rmtree(directory)


def sweep_leftovers() -> list[str]:
    """Remove npt-* netns, cgroups and temp dirs (with their mounts) of runs whose owner is gone.

    A run whose owner process is still alive (another test session) is left alone.
    Returns what was removed.
    """
    removed: list[str] = []
    tmp_root = _run_dirs_root()
    cg_root = cgroups.cgroup2_mount()
    run_ids: set[str] = set()
    for listing in (netns.list_names(), os.listdir(cg_root), os.listdir(tmp_root)):
        for name in listing:
            m = _RUN_ID.match(name)
            if m:
                run_ids.add(m.group(1))
    for run_id in sorted(run_ids):
        run_dir = os.path.join(tmp_root, PREFIX + run_id)
        if _owner_alive(run_dir):
            continue
        for name in netns.list_names():
            if name.startswith(f"{PREFIX}{run_id}-"):
                netns.delete(name)
                removed.append(f"netns {name}")
        cg = os.path.join(cg_root, PREFIX + run_id)
        if os.path.isdir(cg):
            cgroups.remove(cg)
            removed.append(f"cgroup {cg}")
        if os.path.isdir(run_dir):
            _remove_run_dir(run_dir)
            removed.append(f"dir {run_dir}")
    cni_state = "/var/lib/cni/networks"
    if os.path.isdir(cni_state):
        for name in os.listdir(cni_state):
            m = _RUN_ID.match(name)
            if m and not _owner_alive(os.path.join(tmp_root, PREFIX + m.group(1))):
                shutil.rmtree(os.path.join(cni_state, name), ignore_errors=True)
                removed.append(f"cni state {name}")
    return removed


# ---------------------------------------------------------------------------
# The cluster


def testbed_slowdown() -> float:
    """$NODEPROXY_TESTBED_SLOWDOWN: how many times slower than this project's machines the
    testbed runs (>= 1; scripts/vm_test.sh sets it for the emulated VM).  Every wait the
    testbed bounds (a daemon's /ready, a backend's port, a reload, a command in a pod, an
    admin request, a daemon's exit), the integration tests' ``wait_for`` and, above 1, the
    daemons' upstream connect timeout (proxy.connectTimeoutSeconds, 5 s) are this many
    times longer; a wait that is met returns as early as before."""
    raw = os.environ.get("NODEPROXY_TESTBED_SLOWDOWN", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"NODEPROXY_TESTBED_SLOWDOWN={raw!r} is not a number") from None
    if not value >= 1:
        raise ValueError(f"NODEPROXY_TESTBED_SLOWDOWN={raw!r} must be >= 1")
    return value


def scaled(seconds: float) -> float:
    """A wait bound of this project's machines, stretched by $NODEPROXY_TESTBED_SLOWDOWN."""
    return seconds * testbed_slowdown()


class Cluster:
    """N simulated nodes on this machine; use as a context manager.

    ``nodes`` is a count (names node0, node1, ...) or a list of node names.
    ``config`` is merged into every node YAML (e.g. mesh or proxy settings).

    ``capture_mode`` (``ebpf`` or ``iptables``) is written into every node YAML
    (``capture.mode``).

    The VIP ranges are unreachable in every node netns and, with
    ``pod_vip_unreachable`` (the default in ebpf mode), in every pod netns too: a
    node's ICMPv6 "no route" is a soft error for a connecting TCP socket (kernel >=
    6.5, RFC 5461), so without the pod route an uncaptured IPv6 VIP connect would
    fail only after the first SYN retransmit (~1 s) instead of at once.  The eBPF
    capture hooks run before the route lookup, so they are not affected.  iptables
    capture is: the route lookup happens at connect(), before nat OUTPUT, so in
    that mode pods route the VIPs to the bridge like any address (their default
    route), and the node, where the VIPs stay unreachable, answers an uncaptured
    connect (at once for IPv4).
    """

    def __init__(self, nodes: int | Sequence[str] = 2, *, run_id: str | None = None,
                 python: str | None = None, config: Mapping[str, Any] | None = None,
                 private_bpffs: bool = True, sweep: bool = True,
                 plugin_dir: str = cni.DEFAULT_PLUGIN_DIR, pod_vip_unreachable: bool | None = None,
                 mtls: bool = True, trust_domain: str = "cluster.local",
                 capture_mode: str = "ebpf"):
        names = [f"node{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        if not 1 <= len(names) <= 200:
            raise ValueError("a cluster has 1 to 200 nodes")
        self.node_names = names
        self.run_id = run_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-f]{6}", self.run_id):
            raise ValueError("run_id is 6 lowercase hex digits")
        self.python = python or sys.executable
        self.base_config = dict(config or {})
        self.private_bpffs = private_bpffs
        self.sweep = sweep
        self.plugin_dir = plugin_dir
        if capture_mode not in ("ebpf", "iptables"):
            raise ValueError(f"capture_mode is ebpf or iptables, not {capture_mode!r}")
        self.capture_mode = capture_mode
        self.pod_vip_unreachable = (capture_mode == "ebpf" if pod_vip_unreachable is None
                                    else pod_vip_unreachable)
        # mtls: a mesh CA is made for the run and every node signs identities with it.
        self.mtls = mtls
        self.trust_domain = trust_domain
        self.ca_cert = ""
        self.ca_key = ""
        self.dir = os.path.join(_run_dirs_root(), PREFIX + self.run_id)
        self.cgroup_root = ""
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, Service] = {}
        self.timings: dict[str, float] = {}
        self.teardown_errors: list[str] = []
        self._node_processes: list[subprocess.Popen[Any]] = []
        self._started = False
        self._closed = False
        self._lock = threading.RLock()
        self._saved_handlers: dict[int, Any] = {}

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, suffix: str) -> str:
        """The run's name for a netns etc.: npt-<runid>-<suffix>."""
        return f"{PREFIX}{self.run_id}-{suffix}"

    def start(self) -> None:
        """Build the nodes and the links between them."""
        if self._started:
            return
        self._started = True
        t0 = time.monotonic()
        if self.sweep:
            sweep_leftovers()
        os.makedirs(self.dir, mode=0o755)
        Path(self.dir, "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        atexit.register(self.close)
        self._install_signal_handlers()
        self.cgroup_root = cgroups.create(os.path.join(cgroups.cgroup2_mount(),
                                                       PREFIX + self.run_id))
        for index, node_name in enumerate(self.node_names):
            self._add_node(node_name, index)
        self._link_nodes()
        if self.mtls:
            self._make_ca()
        self.timings["build_s"] = time.monotonic() - t0

    def _make_ca(self) -> None:
        """The run's mesh root CA, made with the real CLI (`nodeproxy ca init`)."""
        out = os.path.join(self.dir, "ca")
        subprocess.run([self.python, "-m", "nodeproxy", "ca", "init", "--trust-domain",
                        self.trust_domain, "--out", out], check=True, capture_output=True,
                       env=self.child_env())
        self.ca_cert = os.path.join(out, "root-cert.pem")
        self.ca_key = os.path.join(out, "root-key.pem")

    def _add_node(self, name: str, index: int) -> None:
        ns_name = self.name(name)
        node_dir = os.path.join(self.dir, name)
        os.makedirs(node_dir)
        pod_cidrs = [f"10.244.{index}.0/24", f"fd00:10:244:{index:x}::/64"]
        node = Node(
            name=name, index=index, netns=ns_name, netns_path=netns.path_of(ns_name),
            cgroup=os.path.join(self.cgroup_root, name),
            daemon_cgroup=os.path.join(self.cgroup_root, "daemons", name), pod_cidrs=pod_cidrs,
            network=cni.CniNetwork(name=ns_name, node_netns=netns.path_of(ns_name),
                                   subnets=pod_cidrs, data_dir=os.path.join(node_dir, "ipam"),
                                   plugin_dir=self.plugin_dir),
            dir=node_dir,
            bpffs=os.path.join(node_dir, "bpffs") if self.private_bpffs else None,
            control_socket=os.path.join(node_dir, "control.sock"),
            config_path=os.path.join(node_dir, "node.yaml"),
            daemon_log=os.path.join(node_dir, "daemon.log"),
        )
        self.nodes[name] = node
        netns.add(ns_name)
        netns.sysctl(ns_name, {
            "net.ipv4.ip_forward": 1,
            "net.ipv6.conf.all.forwarding": 1,
            "net.ipv6.conf.default.forwarding": 1,
            "net.ipv6.conf.all.accept_dad": 0,
            "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            # Answer every blackholed VIP connect at once, not rate-limited.
            "net.ipv4.icmp_ratelimit": 0,
            "net.ipv6.icmp.ratelimit": 0,
        })
        self._ip(ns_name, "route", "add", "unreachable", VIP_RANGE4)
        self._ip(ns_name, "-6", "route", "add", "unreachable", VIP_RANGE6)
        cgroups.create(os.path.join(node.cgroup, "pods"))
        cgroups.create(node.daemon_cgroup)
        if node.bpffs:
            os.makedirs(node.bpffs)
            subprocess.run(["mount", "-t", "bpf", "bpf", node.bpffs], check=True,
                           capture_output=True)

    @staticmethod
    def _ip(ns_name: str, *args: str) -> None:
        result = subprocess.run(["ip", "-n", ns_name, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {ns_name} {' '.join(args)}: {result.stderr.strip()}")

    def _link_nodes(self) -> None:
        nodes = list(self.nodes.values())
        link = 0
        for a_i, a in enumerate(nodes):
            for b in nodes[a_i + 1:]:
                a_if, b_if = f"nt{b.index}", f"nt{a.index}"
                a_mac, b_mac = (f"02:4e:50:{link >> 8:02x}:{link & 255:02x}:{end:02x}"
                                for end in (1, 2))
                self._ip(a.netns, "link", "add", a_if, "address", a_mac, "type", "veth",
                         "peer", "name", b_if, "address", b_mac, "netns", b.netns)
                net4 = f"10.250.{link // 64}.{(link % 64) * 4}"
                a4, b4 = _offset(net4, 1), _offset(net4, 2)
                a6, b6 = f"fd00:250:{link:x}::1", f"fd00:250:{link:x}::2"
                for node, ifname, mine4, mine6, peer4, peer6, peer_mac, peer in (
                        (a, a_if, a4, a6, b4, b6, b_mac, b), (b, b_if, b4, b6, a4, a6, a_mac, a)):
                    self._ip(node.netns, "addr", "add", f"{mine4}/30", "dev", ifname)
                    self._ip(node.netns, "-6", "addr", "add", f"{mine6}/64", "dev", ifname,
                             "nodad")
                    self._ip(node.netns, "link", "set", ifname, "up")
                    # Static neighbours: a forwarded packet's first neighbour probe on
                    # this link was seen to go out only after ~1 s (IPv6).
                    for peer_ip in (peer4, peer6):
                        self._ip(node.netns, "neigh", "replace", peer_ip, "lladdr", peer_mac,
                                 "dev", ifname, "nud", "permanent")
                    self._ip(node.netns, "route", "add", peer.pod_cidrs[0], "via", peer4)
                    self._ip(node.netns, "-6", "route", "add", peer.pod_cidrs[1], "via", peer6)
                link += 1

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._saved_handlers[sig] = signal.signal(sig, on_signal)

    def close(self) -> None:
        """Tear everything down in reverse order; idempotent, never raises."""
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
            interrupted: list[int] = []
            deferred = self._defer_signals(interrupted)
            t0 = time.monotonic()
            try:
                self._teardown()
            finally:
                self.timings["teardown_s"] = time.monotonic() - t0
                for sig, handler in {**deferred, **self._saved_handlers}.items():
                    with contextlib.suppress(ValueError, TypeError):
                        signal.signal(sig, handler)
                atexit.unregister(self.close)
            for problem in self.teardown_errors:
                print(f"testbed teardown: {problem}", file=sys.stderr)
            if interrupted:
                raise KeyboardInterrupt

    def _defer_signals(self, interrupted: list[int]) -> dict[int, Any]:
        """While tearing down, remember SIGINT/SIGTERM instead of dying half way."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        saved = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):
                saved[sig] = signal.signal(sig, lambda s, _f: interrupted.append(s))
        return saved

    def _attempt(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # teardown goes on; the problem is reported
            self.teardown_errors.append(f"{what}: {e}")

    def _teardown(self) -> None:
        for pod in reversed(list(self.pods.values())):
            self._attempt(f"stop processes of pod {pod.name}", self._kill_pod_processes, pod)
        self._attempt("stop daemons", self.stop_daemons)
        for proc in self._node_processes:
            self._attempt("stop node process", _kill, proc)
        for pod in reversed(list(self.pods.values())):
            self._attempt(f"remove pod {pod.name}", self._remove_pod_network, pod)
        self.pods.clear()
        for node in reversed(list(self.nodes.values())):
            self._attempt(f"remove node netns {node.netns}", netns.delete, node.netns)
        if self.cgroup_root:
            self._attempt("remove cgroups", cgroups.remove, self.cgroup_root)
        if os.path.isdir(self.dir):
            self._attempt("remove run dir", _remove_run_dir, self.dir)

    # -- pods -----------------------------------------------------------------

    def add_pod(self, node: str, name: str, namespace: str = "default",
                service_account: str = "default", labels: Mapping[str, str] | None = None,
                enroll: bool = True, in_cgroup: bool = True,
                settings: Mapping[str, Any] | None = None) -> Pod:
        """A pod on ``node``: netns wired by CNI; its cgroup unless in_cgroup=False.
        ``settings``: more fields of its workload entry (e.g. {"splice": False}).

        enroll=True lists it in the node YAMLs and, when daemons run, enrolls it
        through every daemon's control socket at once.
        """
        if name in self.pods:
            raise ValueError(f"pod {name} exists (pod names are unique in a testbed)")
        n = self.nodes[node]
        ns_name = self.name(name)
        pod = Pod(name=name, namespace=namespace, node=node, service_account=service_account,
                  labels=dict(labels or {}), netns=ns_name, netns_path=netns.path_of(ns_name),
                  cgroup=os.path.join(n.cgroup, "pods", name) if in_cgroup else None,
                  ips=[], enrolled=False, settings=dict(settings or {}))
        self.pods[name] = pod
        try:
            netns.add(ns_name)
            netns.sysctl(ns_name, {"net.ipv6.conf.all.accept_dad": 0,
                                   "net.ipv6.conf.default.accept_dad": 0})
            if self.pod_vip_unreachable:
                self._ip(ns_name, "route", "add", "unreachable", VIP_RANGE4)
                self._ip(ns_name, "-6", "route", "add", "unreachable", VIP_RANGE6)
            pod.cni_result = n.network.add(ns_name, pod.netns_path)
            pod.ips = cni.result_ips(pod.cni_result)
            if pod.cgroup:
                cgroups.create(pod.cgroup)
            if enroll:
                self.enroll(name)
        except BaseException:
            self.remove_pod(name)
            raise
        return pod

    def add_unenrolled_pod(self, node: str, name: str, namespace: str = "default",
                           labels: Mapping[str, str] | None = None) -> Pod:
        """A pod outside the mesh: not enrolled and its processes in no pod cgroup."""
        return self.add_pod(node, name, namespace, labels=labels, enroll=False, in_cgroup=False)

    def _pod(self, pod: str | Pod) -> Pod:
        return self.pods[pod] if isinstance(pod, str) else pod

    def enroll(self, pod: str | Pod) -> None:
        """Mark enrolled; with daemons running, POST it to each (remote ones get ``node``)."""
        p = self._pod(pod)
        p.enrolled = True
        for node in self._running_nodes():
            body = json.dumps(p.workload(node.name)).encode()
            status, text = netns.unix_http(node.control_socket, "POST", "/v1/pods", body,
                                           {"Content-Type": "application/json"})
            if not 200 <= status < 300:
                raise DaemonError(f"enroll {p.key} on {node.name}: HTTP {status}: {text}")

    def unenroll(self, pod: str | Pod) -> None:
        """Unmark; with daemons running, DELETE it from each."""
        p = self._pod(pod)
        p.enrolled = False
        for node in self._running_nodes():
            status, text = netns.unix_http(node.control_socket, "DELETE",
                                           f"/v1/pods/{p.namespace}/{p.name}")
            if not (200 <= status < 300 or status == 404):
                raise DaemonError(f"unenroll {p.key} on {node.name}: HTTP {status}: {text}")

    def remove_pod(self, pod: str | Pod) -> None:
        """Unenroll, kill its processes, CNI DEL, delete its netns and cgroup."""
        p = self._pod(pod)
        if p.enrolled:
            with contextlib.suppress(OSError, DaemonError):
                self.unenroll(p)
        self._kill_pod_processes(p)
        self._remove_pod_network(p)
        self.pods.pop(p.name, None)

    def _kill_pod_processes(self, pod: Pod) -> None:
        if pod.cgroup:
            cgroups.kill(pod.cgroup)
        for proc in pod.processes:
            _kill(proc)
        netns.kill_all(pod.netns)

    def _remove_pod_network(self, pod: Pod) -> None:
        node = self.nodes[pod.node]
        problems: list[str] = []
        if netns.exists(pod.netns) and netns.exists(node.netns):
            problems = node.network.delete(pod.netns, pod.netns_path, pod.cni_result or None)
        netns.delete(pod.netns)
        if pod.cgroup:
            cgroups.remove(pod.cgroup)
        if problems:
            raise cni.CniError("; ".join(problems))

    # -- services -------------------------------------------------------------

    def add_service(self, name: str, namespace: str = "default", vip4: str | None = None,
                    vip6: str | None = None, port: int = 80, target_port: int | None = None,
                    selector: Mapping[str, str] | None = None, app_protocol: str | None = None,
                    traffic_policy: Mapping[str, Any] | None = None) -> Service:
        """A service; VIPs default to the next free ones in the VIP ranges, selector to app=name;
        app_protocol and traffic_policy as the node YAML has them (None: not set)."""
        n = len(self.services)
        vip4 = vip4 or str(ipaddress.ip_network(VIP_RANGE4)[10 + n])
        vip6 = vip6 or str(ipaddress.ip_network(VIP_RANGE6)[10 + n])
        for vip, vip_range in ((vip4, VIP_RANGE4), (vip6, VIP_RANGE6)):
            if ipaddress.ip_address(vip) not in ipaddress.ip_network(vip_range):
                raise ValueError(f"VIP {vip} is outside {vip_range} (blackholed on nodes)")
        service = Service(name=name, namespace=namespace, vips=[vip4, vip6], port=port,
                          target_port=target_port or port,
                          selector=dict(selector or {"app": name}),
                          app_protocol=app_protocol,
                          traffic_policy=dict(traffic_policy) if traffic_policy else None)
        self.services[service.key] = service
        return service

    # -- configuration and daemons ---------------------------------------------

    def node_config(self, node: str, overrides: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
        """The YAML document of one node, as a dict."""
        n = self.nodes[node]
        settings: dict[str, Any] = {"name": n.name, "podCgroup": n.cgroup,
                                    "stateDir": os.path.join(self.dir, n.name)}
        if n.bpffs:
            settings["bpffs"] = n.bpffs
        config: dict[str, Any] = {
            "apiVersion": _API_VERSION,
            "kind": _KIND,
            "node": settings,
            "proxy": {"drainSeconds": 2.0},
            "admin": {"controlSocket": n.control_socket},
            "capture": {"mode": self.capture_mode},
            "workloads": [p.workload(node) for p in self.pods.values() if p.enrolled],
            "services": [s.config() for s in self.services.values()],
            # Kubelet-style probes come from the node's bridge addresses.
            "inbound": {"probeSources": [n.gateway4, n.gateway6]},
        }
        if testbed_slowdown() > 1:
            # The daemon's own bound on an upstream connect (default 5 s): under emulation
            # a daemon compiling its programs starves the others' event loops for longer.
            config["proxy"]["connectTimeoutSeconds"] = min(300.0, scaled(5.0))
        if self.mtls:
            config["mesh"] = {"trustDomain": self.trust_domain}
            config["identity"] = {"caCert": self.ca_cert, "caKey": self.ca_key}
        config = deep_merge(config, self.base_config)
        return deep_merge(config, overrides or {})

    def write_configs(self, overrides: Mapping[str, Any] | None = None,
                      per_node: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> dict[str, str]:
        """Write one node YAML per node (all enrolled pods, all services); return the paths."""
        paths = {}
        for name, node in self.nodes.items():
            config = self.node_config(name, overrides)
            config = deep_merge(config, (per_node or {}).get(name, {}))
            node.config = config
            Path(node.config_path).write_text(yaml.safe_dump(config, sort_keys=False))
            paths[name] = node.config_path
        return paths

    def daemon_argv(self, node: str, extra: Sequence[str] = ()) -> list[str]:
        """argv of a daemon of the node: in the node's netns and its daemon cgroup."""
        n = self.nodes[node]
        inner = netns.nsenter_argv(n.netns_path, [self.python, "-m", "nodeproxy", "run",
                                                  "--config", n.config_path, *extra])
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                os.path.join(n.daemon_cgroup, "cgroup.procs"), *inner]

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the processes we start: the repo importable, unbuffered output."""
        env = dict(os.environ)
        paths = [REPO_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def start_daemons(self, timeout: float = 60.0, nodes: Sequence[str] | None = None,
                      extra_args: Sequence[str] = ()) -> None:
        """Start one daemon per node inside its netns and wait until each answers /ready.

        The wait is ``timeout`` times $NODEPROXY_TESTBED_SLOWDOWN (default 1): under
        QEMU's software emulation (`make vm-test`) compiling the programs alone takes
        longer than a minute."""
        timeout = scaled(timeout)
        targets = [self.nodes[n] for n in (nodes or self.nodes)]
        if any(not n.config for n in targets):
            self.write_configs()
        t0 = time.monotonic()
        for node in targets:
            if node.daemon is not None and node.daemon.poll() is None:
                continue
            with open(node.daemon_log, "ab") as log:
                node.daemon = subprocess.Popen(
                    self.daemon_argv(node.name, extra_args), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=self.child_env(),
                    start_new_session=True)
        deadline = time.monotonic() + timeout
        pending = list(targets)
        while pending:
            for node in list(pending):
                assert node.daemon is not None
                if node.daemon.poll() is not None:
                    raise DaemonError(f"daemon of {node.name} exited with "
                                      f"{node.daemon.returncode}:\n{self.daemon_output(node.name)}")
                if self.ready(node.name):
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                raise DaemonError(f"daemon of {pending[0].name} not ready after {timeout}s:\n"
                                  f"{self.daemon_output(pending[0].name)}")
            if pending:
                time.sleep(0.05)
        self.timings["daemons_ready_s"] = time.monotonic() - t0

    def daemon_output(self, node: str, tail: int = 4000) -> str:
        """The last characters of a daemon's stdout+stderr."""
        try:
            return Path(self.nodes[node].daemon_log).read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def ready(self, node: str) -> bool:
        try:
            return self.admin_get(node, "/ready", timeout=1.0)[0] == 200
        except OSError:
            return False

    def _running_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.daemon is not None and n.daemon.poll() is None]

    def stop_daemons(self, timeout: float | None = None) -> dict[str, int | None]:
        """SIGTERM every daemon, wait (drain + 10 s by default), then SIGKILL; exit codes."""
        codes: dict[str, int | None] = {}
        running = [n for n in self.nodes.values() if n.daemon is not None]
        for node in running:
            assert node.daemon is not None
            if node.daemon.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.daemon.send_signal(signal.SIGTERM)
        for node in running:
            assert node.daemon is not None
            drain = float(node.config.get("proxy", {}).get("drainSeconds", 10.0))
            try:
                codes[node.name] = node.daemon.wait(timeout if timeout is not None
                                                    else scaled(drain + 10.0))
            except subprocess.TimeoutExpired:
                node.daemon.kill()
                node.daemon.wait()
                codes[node.name] = None  # did not stop by itself
            node.daemon = None
        return codes

    def reload_daemons(self, timeout: float = 30.0) -> None:
        """SIGHUP every running daemon (after write_configs) and wait until each runs the
        file now on disk (its /config_dump digest is the file's SHA-256; the daemon's own
        file watch may have got there first)."""
        running = self._running_nodes()
        wanted = {n.name: hashlib.sha256(Path(n.config_path).read_bytes()).hexdigest()
                  for n in running}
        for n in running:
            assert n.daemon is not None
            n.daemon.send_signal(signal.SIGHUP)
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        for n in running:
            while self.admin_json(n.name, "/config_dump").get("digest") != wanted[n.name]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n.name}: the daemon did not apply the new policy "
                                       f"within {timeout:.0f} s:\n{self.daemon_output(n.name)}")
                time.sleep(0.05)

    # -- processes --------------------------------------------------------------

    def pod_argv(self, pod: str | Pod, argv: Sequence[str]) -> list[str]:
        """argv that runs inside the pod's netns, placed in its cgroup first (if it has one)."""
        p = self._pod(pod)
        inner = netns.nsenter_argv(p.netns_path, argv)
        if not p.cgroup:
            return inner
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                os.path.join(p.cgroup, "cgroup.procs"), *inner]

    def spawn_in_pod(self, pod: str | Pod, argv: Sequence[str],
                     **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the pod (its cgroup + netns); killed at teardown."""
        p = self._pod(pod)
        popen_kw.setdefault("env", self.child_env())
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.pod_argv(p, argv), **popen_kw)
        p.processes.append(proc)
        return proc

    def run_in_pod(self, pod: str | Pod, argv: Sequence[str], timeout: float = 60.0,
                   check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command in the pod to completion and capture its output (text)."""
        proc = self.spawn_in_pod(pod, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            out, err = proc.communicate(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._pod(pod).processes.remove(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def spawn_in_node(self, node: str, argv: Sequence[str],
                      **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the node's netns (caller's cgroup); killed at teardown."""
        popen_kw.setdefault("env", self.child_env())
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(netns.nsenter_argv(self.nodes[node].netns_path, argv), **popen_kw)
        self._node_processes.append(proc)
        return proc

    def run_in_node(self, node: str, argv: Sequence[str],
                    timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return netns.run(self.nodes[node].netns_path, argv, check=False, timeout=timeout)

    def tool_argv(self, module: str, *args: str) -> list[str]:
        """argv of a testbed tool (python -m nodeproxy_dev.testbed.<module> ...)."""
        return [self.python, "-m", f"nodeproxy_dev.testbed.{module}", *args]

    def peer_argv(self, *args: str) -> list[str]:
        """argv of the traffic peer tool (python -m nodeproxy_dev.testbed.peer ...)."""
        return self.tool_argv("peer", *args)

    def _json_tool(self, pod: str | Pod, argv: Sequence[str], timeout: float
                   ) -> dict[str, Any]:
        """Run a tool in the pod; its final JSON line (with ``exit_code`` added)."""
        result = self.run_in_pod(pod, argv, timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"{' '.join(argv[2:])} printed no result "
                               f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
        out: dict[str, Any] = json.loads(lines[-1])
        out["exit_code"] = result.returncode
        return out

    def peer(self, pod: str | Pod, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a peer client in the pod; its final JSON line (with ``exit_code`` added)."""
        return self._json_tool(pod, self.peer_argv(*args), timeout)

    def grpc_client(self, pod: str | Pod, *args: str, timeout: float = 120.0
                    ) -> dict[str, Any]:
        """Run the gRPC test client (``grpc_client ... --json``) in the pod; its JSON
        summary (with ``exit_code`` added)."""
        return self._json_tool(pod, self.tool_argv("grpc_client", *args, "--json"), timeout)

    def serve(self, pod: str | Pod, argv: Sequence[str], port: int, timeout: float = 10.0,
              **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a server in the pod (killed at teardown) and wait until it listens on the
        port and the port accepts a connection from the node (an error at once if it
        exits first)."""
        p = self._pod(pod)
        popen_kw.setdefault("stdout", subprocess.DEVNULL)
        proc = self.spawn_in_pod(p, argv, **popen_kw)
        # The server's own listener first: from the node, an enrolled pod's port accepts
        # (the proxy's inbound listener) before the server is up.
        netns.wait_for_listener(p.netns_path, port, scaled(timeout), process=proc)
        netns.wait_for_port(self.nodes[p.node].netns_path, p.ip4, port, scaled(timeout),
                            process=proc)
        return proc

    def serve_peer(self, pod: str | Pod, port: int, timeout: float = 10.0,
                   *extra: str, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``peer serve`` in the pod and wait until its port accepts (from the node);
        ``extra``: more arguments (``--log-connections``)."""
        p = self._pod(pod)
        return self.serve(p, self.peer_argv("serve", "--port", str(port), "--name", p.name,
                                            *extra), port, timeout, **popen_kw)

    def serve_http(self, pod: str | Pod, port: int, name: str | None = None, *extra: str,
                   timeout: float = 10.0, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start the HTTP/1.1 test backend (``http_backend``) in the pod, named ``name``
        (default: the pod's), and wait until its port accepts; ``extra``: more arguments
        (``--log FILE``).  The readiness connect counts in its connections_total."""
        p = self._pod(pod)
        return self.serve(p, self.tool_argv("http_backend", "--port", str(port), "--name",
                                            name or p.name, *extra), port, timeout, **popen_kw)

    def serve_grpc(self, pod: str | Pod, port: int, name: str | None = None, *extra: str,
                   timeout: float = 10.0, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start the gRPC test backend (``grpc_backend``, service test.Echo) in the pod,
        named ``name`` (default: the pod's), and wait until its port accepts."""
        p = self._pod(pod)
        return self.serve(p, self.tool_argv("grpc_backend", "--port", str(port), "--name",
                                            name or p.name, *extra), port, timeout, **popen_kw)

    def serve_h2c(self, pod: str | Pod, port: int, name: str | None = None,
                  timeout: float = 10.0) -> subprocess.Popen[Any]:
        """Start nginx in the pod as an HTTP/2 cleartext backend (prior knowledge; see
        ``nginx.h2c_config``); its files are in ``<run dir>/h2c/<pod>-<port>/``."""
        p = self._pod(pod)
        directory = os.path.join(self.dir, "h2c", f"{p.name}-{port}")
        os.makedirs(directory, exist_ok=True)
        Path(directory, "nginx.conf").write_text(nginx.h2c_config(directory, port,
                                                                  name or p.name))
        with open(os.path.join(directory, "stderr.log"), "wb") as log:
            return self.serve(p, nginx.nginx_argv(directory, nginx=shutil.which("nginx")
                                                  or "/usr/sbin/nginx"),
                              port, timeout, stdout=log, stderr=subprocess.STDOUT)

    def serve_guarded(self, pod: str | Pod, port: int, *, http2: bool = False,
                      timeout: float = 10.0) -> str:
        """Start nginx in the pod as the backend adversarial tests attack (HTTP/1.1, or
        HTTP/2 cleartext with ``http2``; see ``nginx.guarded_config``).  Returns its
        directory, ``<run dir>/guarded/<pod>-<port>/``, whose ``access.log`` has one JSON
        line per request nginx served."""
        p = self._pod(pod)
        directory = os.path.join(self.dir, "guarded", f"{p.name}-{port}")
        os.makedirs(directory, exist_ok=True)
        Path(directory, "nginx.conf").write_text(
            nginx.guarded_config(directory, port, p.name, http2=http2))
        with open(os.path.join(directory, "stderr.log"), "wb") as log:
            self.serve(p, nginx.nginx_argv(directory, nginx=shutil.which("nginx")
                                           or "/usr/sbin/nginx"),
                       port, timeout, stdout=log, stderr=subprocess.STDOUT)
        return directory

    # -- observing daemons -------------------------------------------------------

    def admin_get(self, node: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET http://127.0.0.1:<admin port><path> inside the node netns: (status, body)."""
        n = self.nodes[node]
        return netns.http_get(n.netns_path, f"http://127.0.0.1:{n.admin_port()}{path}",
                              scaled(timeout))

    def admin_json(self, node: str, path: str, timeout: float = 5.0) -> Any:
        status, body = self.admin_get(node, path, timeout)
        if status != 200:
            raise DaemonError(f"GET {path} on {node}: HTTP {status}: {body[:500]}")
        return json.loads(body)

    def metrics(self, node: str, timeout: float = 5.0) -> str:
        """The node daemon's Prometheus text (GET :15020/metrics inside the node netns)."""
        n = self.nodes[node]
        status, body = netns.http_get(n.netns_path,
                                      f"http://127.0.0.1:{n.metrics_port()}/metrics",
                                      scaled(timeout))
        if status != 200:
            raise DaemonError(f"GET /metrics on {node}: HTTP {status}")
        return body


def _offset(address: str, n: int) -> str:
    return str(ipaddress.ip_address(address) + n)


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
