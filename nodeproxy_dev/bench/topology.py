"""The one two-node cluster every configuration runs on, its servers and the HAProxy pod.

node0: ``srv-0`` (meshed server pod), ``plain-0`` (the same servers, outside the
mesh), ``client`` (meshed client), ``client-direct`` (client outside the mesh) and
``haproxy`` (HAProxy in a pod of its own, outside the mesh).  node1: ``srv-1`` and
``plain-1``.  Every server pod runs sockperf, iperf3, nginx (HTTP/1.1, and HTTP/2 prior
knowledge on H2C_PORT), the testbed peer and the gRPC unary benchmark's server.

Why two server pods per node: the mesh steers *every* plaintext connection into a
meshed pod through the node proxy (``sk_lookup``), so a direct connection to a
meshed pod is not direct.  The baseline and HAProxy therefore talk to identical
server processes in an unenrolled pod beside the meshed one, on the same bridge.

Services ``srv<i>-<kind>`` (VIP port = the server's port, 80 for HTTP) select the
meshed server pod of node i.  Clients reach them by VIP, so the mesh path is the
product's: capture, admission, then the same-node relay or HBONE to node1.  The HTTP
services' ``appProtocol`` is what the configuration measured declares (``tcp``: relayed
as bytes; ``http``: parsed, routed, retried and counted per request), switched by a hot
reload like the other live settings.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeproxy.config.changes import RESTART_ONLY
from nodeproxy_dev.bench import haproxy
from nodeproxy_dev.bench.settings import Settings
from nodeproxy_dev.bench.vocabulary import NetPath, ServerKind
from nodeproxy_dev.testbed import netns
from nodeproxy_dev.testbed.cluster import Cluster, Pod, Service, deep_merge
from nodeproxy_dev.testbed.nginx import nginx_config

NODES = ("node0", "node1")
MESH_CLIENT, DIRECT_CLIENT, HAPROXY_POD = "client", "client-direct", "haproxy"
HTTP_VIP_PORT = 80
MESH_CLIENT_ACCOUNT = "client"  # the meshed client's service account
OTLP_PORT = 4318  # the trace collector of the configurations that export spans
HTTP_FILE = "bench/small.bin"  # under the path prefix nodeproxy-l7 and haproxy-http route
# nginx also serves the file over HTTP/2 prior knowledge (h2c) here: the direct baseline
# of the HTTP/2 scenario (the proxies take HTTP/2 from the client and speak HTTP/1.1 to
# nginx's HTTP port).
H2C_PORT = 8082

# The noisy-neighbour scenario's hostile pods on node0 and what they attack.  ``attacker``
# (meshed) attacks a service of its own (``attack-target``, appProtocol http: parsed,
# HTTP/1.1 or HTTP/2 prior knowledge), served by a second nginx in srv-0, so the attack
# shares the node proxy with the quiet client but not the quiet client's nginx.
# ``attacker-direct`` (unenrolled) does the same through HAProxy (its ``attack`` frontend,
# to the same second nginx in plain-0).  Made on first use only (``ensure_attacker``): no
# other scenario sees them.
ATTACKER_POD, ATTACKER_ACCOUNT = "attacker", "attacker"
ATTACKER_DIRECT_POD = "attacker-direct"
ATTACK_SERVICE = "attack-target"
ATTACK_TARGET_PORT = 8081
ATTACK_WORKER_CONNECTIONS = 16384


# Per-netns sysctls of the client and HAProxy pods: connection-rate runs leave many
# sockets in TIME_WAIT, and the idle-connection test opens thousands at once.
CLIENT_SYSCTLS: dict[str, str | int] = {"net.ipv4.tcp_tw_reuse": 1,
                                        "net.ipv4.ip_local_port_range": "10000 65000"}


def server_pod(node: str, meshed: bool) -> str:
    index = NODES.index(node)
    return f"srv-{index}" if meshed else f"plain-{index}"


def service_name(node: str, kind: ServerKind) -> str:
    return f"srv{NODES.index(node)}-{kind.value}"


def wait_listening(netns_path: str, port: int, timeout: float = 15.0) -> None:
    """Poll ``ss`` inside the netns until something listens on the TCP port.

    A connect probe would not do for meshed pods: the mesh accepts it on the
    application's behalf (and holds the port, so the application's bind fails).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = netns.run(netns_path, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if result.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} in {netns_path} "
                               f"after {timeout:.0f}s")
        time.sleep(0.05)


# The benchmark's one client pod opens more connections (the idle scenario: up to 10,000)
# and faster than a pod's default fair share allows: the caps are lifted, so the figures
# are the proxy's and not a cap's (docs/architecture.md, "Limits").
BENCH_LIMITS: dict[str, Any] = {"limits": {"perPod": {
    "maxConnections": 1_000_000, "connectionsPerSecond": 1_000_000, "maxRequests": 1_000_000}}}


class BenchCluster:
    """Builds the benchmark topology on a testbed ``Cluster`` and starts every server."""

    def __init__(self, cluster: Cluster, settings: Settings, startup_timeout: float = 120.0):
        self.cluster = cluster
        self.settings = settings
        self.startup_timeout = startup_timeout
        self.haproxy: subprocess.Popen[Any] | None = None
        self.daemon_overrides: dict[str, Any] = {}
        self.http_app_protocol: str | None = None  # as the daemons run: None = undeclared
        self.http_traffic_policy: dict[str, Any] | None = None  # the HTTP services' policy
        self.collectors: list[subprocess.Popen[Any]] = []  # OTLP receivers, one per node
        self.attack_nginx: list[subprocess.Popen[Any]] = []  # noisy neighbour's targets
        # The file every nginx serves (the same bytes in every server pod: a client can
        # check what it got whichever pod answered).
        self.http_body = os.urandom(settings.http_body)

    # -- building -------------------------------------------------------------

    def build(self) -> None:
        """Pods, services, daemons, servers, HAProxy; raises if any does not come up."""
        c = self.cluster
        for node in NODES:
            index = NODES.index(node)
            c.add_pod(node, server_pod(node, True), labels={"app": f"srv{index}"},
                      service_account="server")
            c.add_unenrolled_pod(node, server_pod(node, False), labels={"app": f"plain{index}"})
            for kind in ServerKind:
                port = HTTP_VIP_PORT if kind is ServerKind.HTTP else kind.port
                # The L4 servers' ports are declared tcp: never sniffed, so always spliced
                # under nodeproxy-splice (a sniffed flow is not spliced).
                # The gRPC server's is declared grpc: parsed, HTTP/2 upstream (only the
                # L7 configurations measure it).
                protocol = {ServerKind.HTTP: None, ServerKind.GRPC: "grpc"}.get(kind, "tcp")
                c.add_service(service_name(node, kind), port=port, target_port=kind.port,
                              selector={"app": f"srv{index}"}, app_protocol=protocol)
        c.add_pod("node0", MESH_CLIENT, labels={"app": "client"},
                  service_account=MESH_CLIENT_ACCOUNT)
        c.add_unenrolled_pod("node0", DIRECT_CLIENT)
        c.add_unenrolled_pod("node0", HAPROXY_POD)
        for name in (MESH_CLIENT, DIRECT_CLIENT, HAPROXY_POD):
            netns.sysctl(c.pods[name].netns_path, CLIENT_SYSCTLS)
        self._write_configs({})
        c.start_daemons(timeout=self.startup_timeout)
        for node in NODES:
            for meshed in (True, False):
                self._start_servers(c.pods[server_pod(node, meshed)])
        self._start_haproxy()

    def _start_servers(self, pod: Pod) -> None:
        c = self.cluster
        directory = os.path.join(c.dir, "bench", pod.name)
        served = Path(directory, "www", HTTP_FILE)
        served.parent.mkdir(parents=True, exist_ok=True)
        served.write_bytes(self.http_body)
        conf = os.path.join(directory, "nginx.conf")
        Path(conf).write_text(nginx_config(
            directory, ServerKind.HTTP.port, f"root {directory}/www;",
            http="    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
                 "    default_type application/octet-stream;\n"
                 f"    server {{ listen 0.0.0.0:{H2C_PORT} http2; root {directory}/www; }}",
            worker_connections=4096))
        commands = {
            ServerKind.SOCKPERF: ["sockperf", "server", "--tcp", "-i", "0.0.0.0",
                                  "-p", str(ServerKind.SOCKPERF.port)],
            ServerKind.IPERF3: ["iperf3", "-s", "-p", str(ServerKind.IPERF3.port)],
            ServerKind.HTTP: ["nginx", "-p", directory, "-c", conf,
                              "-e", os.path.join(directory, "error.log")],
            ServerKind.ECHO: c.peer_argv("serve", "--port", str(ServerKind.ECHO.port),
                                         "--name", pod.name),
            ServerKind.GRPC: [c.python, "-m", "nodeproxy_dev.bench.grpcunary", "serve",
                              "--port", str(ServerKind.GRPC.port)],
        }
        for kind, argv in commands.items():
            with open(os.path.join(directory, f"{kind.value}.log"), "wb") as log:
                c.spawn_in_pod(pod, argv, stdout=log, stderr=subprocess.STDOUT)
        for kind in ServerKind:
            wait_listening(pod.netns_path, kind.port)
        wait_listening(pod.netns_path, H2C_PORT)

    def _start_haproxy(self) -> None:
        c = self.cluster
        directory = os.path.join(c.dir, "bench", HAPROXY_POD)
        os.makedirs(directory, exist_ok=True)
        backends = {NODES.index(node): c.pods[server_pod(node, False)].ip4 for node in NODES}
        conf = os.path.join(directory, "haproxy.cfg")
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # what haproxy inherits
        attack = f"{c.pods[server_pod('node0', False)].ip4}:{ATTACK_TARGET_PORT}"
        Path(conf).write_text(haproxy.config(backends, directory, haproxy.maxconn(nofile),
                                             attack_backend=attack))
        check = subprocess.run(["haproxy", "-c", "-f", conf], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        with open(os.path.join(directory, "haproxy.log"), "wb") as log:
            self.haproxy = c.spawn_in_pod(HAPROXY_POD, ["haproxy", "-db", "-f", conf],
                                          stdout=log, stderr=subprocess.STDOUT)
        pod = c.pods[HAPROXY_POD]
        for node in NODES:
            for kind in ServerKind:
                wait_listening(pod.netns_path, haproxy.frontend_port(NODES.index(node), kind))
            wait_listening(pod.netns_path, haproxy.http_mode_port(NODES.index(node)))
            wait_listening(pod.netns_path, haproxy.grpc_mode_port(NODES.index(node)))
        wait_listening(pod.netns_path, haproxy.ATTACK_PORT)

    # -- the daemons ----------------------------------------------------------

    def daemon_pid(self, node: str) -> int:
        daemon = self.cluster.nodes[node].daemon
        if daemon is None or daemon.poll() is not None:
            raise RuntimeError(f"the nodeproxy daemon of {node} is not running:\n"
                               f"{self.cluster.daemon_output(node, 1500)}")
        return daemon.pid

    def haproxy_pid(self) -> int:
        if self.haproxy is None or self.haproxy.poll() is not None:
            raise RuntimeError("haproxy is not running")
        return self.haproxy.pid

    def ensure_daemon_overrides(self, overrides: Mapping[str, Any],
                                http_app_protocol: str | None = None,
                                http_traffic_policy: Mapping[str, Any] | None = None) -> None:
        """Give the daemons these node-YAML overrides, and the HTTP services this
        ``appProtocol`` and ``trafficPolicy``, unless they already run them: a hot reload
        when only live sections differ (fastPath, services, httpRoutes), else a restart
        (capture).

        The hook for configurations that need the daemon set up differently (a
        capture mode, splice on or off, HTTP parsed or relayed): the suite calls it
        before each of their measurements and groups configurations needing a
        restart into blocks.  The reload returns once every daemon runs the new file
        (its config digest), so the next connection sees the new settings.
        """
        wanted = dict(overrides)
        policy = dict(http_traffic_policy) if http_traffic_policy else None
        if wanted == self.daemon_overrides and http_app_protocol == self.http_app_protocol \
                and policy == self.http_traffic_policy:
            return
        c = self.cluster
        for node in NODES:
            service = c.services[f"default/{service_name(node, ServerKind.HTTP)}"]
            service.app_protocol = http_app_protocol
            service.traffic_policy = policy
        changed = {key for key in set(wanted) | set(self.daemon_overrides)
                   if wanted.get(key) != self.daemon_overrides.get(key)}
        if changed & set(RESTART_ONLY):
            c.stop_daemons()
            self._write_configs(wanted)
            c.start_daemons(timeout=self.startup_timeout)
        else:
            # Live sections (fastPath, services, httpRoutes): a hot reload, as an operator
            # would do it.
            self._write_configs(wanted)
            c.reload_daemons(timeout=self.startup_timeout)
        self.daemon_overrides = wanted
        self.http_app_protocol = http_app_protocol
        self.http_traffic_policy = policy

    def ensure_collectors(self) -> None:
        """An OTLP/HTTP trace receiver on 127.0.0.1:OTLP_PORT in each node's netns, where
        that node's daemon exports its spans (started once, stopped at teardown)."""
        if self.collectors and all(p.poll() is None for p in self.collectors):
            return
        c = self.cluster
        for node in NODES:
            self.collectors.append(c.spawn_in_node(
                node, c.tool_argv("otlp_receiver", "--port", str(OTLP_PORT),
                                  "--out", "/dev/null"),
                stdout=subprocess.DEVNULL))
            wait_listening(c.nodes[node].netns_path, OTLP_PORT)

    def ensure_attacker(self) -> Service:
        """The hostile pods (``attacker`` enrolled on node0 with service account
        ``attacker``, ``attacker-direct`` unenrolled), the service ``attacker`` attacks
        (``attack-target``, VIP port 80, appProtocol http) and the nginx behind it and
        behind HAProxy's attack frontend (port 8081 of srv-0 and plain-0, a 2-byte
        answer); made once, on first use.  The daemons get the service by a hot reload
        with their current settings."""
        c = self.cluster
        key = f"default/{ATTACK_SERVICE}"
        if self.attack_nginx:
            if any(p.poll() is not None for p in self.attack_nginx):
                raise RuntimeError("an attack-target nginx has exited")
            return c.services[key]
        for meshed in (True, False):
            self.attack_nginx.append(self._start_attack_nginx(c.pods[server_pod("node0",
                                                                                 meshed)]))
        if key not in c.services:
            c.add_service(ATTACK_SERVICE, port=HTTP_VIP_PORT, target_port=ATTACK_TARGET_PORT,
                          selector={"app": "srv0"}, app_protocol="http")
        if ATTACKER_POD not in c.pods:
            c.add_pod("node0", ATTACKER_POD, labels={"app": ATTACKER_POD},
                      service_account=ATTACKER_ACCOUNT)
            c.add_unenrolled_pod("node0", ATTACKER_DIRECT_POD)
            for name in (ATTACKER_POD, ATTACKER_DIRECT_POD):
                netns.sysctl(c.pods[name].netns_path, CLIENT_SYSCTLS)
        self._write_configs(self.daemon_overrides)
        c.reload_daemons(timeout=self.startup_timeout)
        return c.services[key]

    def _write_configs(self, overrides: Mapping[str, Any]) -> None:
        """Every node's YAML: the bench's own limits, then the configuration's overrides
        (so a reload for a new service keeps both)."""
        self.cluster.write_configs(overrides=deep_merge(BENCH_LIMITS, overrides))

    def _start_attack_nginx(self, pod: Pod) -> subprocess.Popen[Any]:
        directory = os.path.join(self.cluster.dir, "bench", f"{ATTACK_SERVICE}-{pod.name}")
        os.makedirs(directory, exist_ok=True)
        conf = os.path.join(directory, "nginx.conf")
        Path(conf).write_text(nginx_config(
            directory, ATTACK_TARGET_PORT, 'location / { return 200 "a\\n"; }',
            http="    keepalive_requests 1000000;\n    keepalive_timeout 300s;",
            worker_connections=ATTACK_WORKER_CONNECTIONS))
        with open(os.path.join(directory, "nginx.log"), "wb") as log:
            proc = self.cluster.spawn_in_pod(
                pod, ["nginx", "-p", directory, "-c", conf,
                      "-e", os.path.join(directory, "error.log")],
                stdout=log, stderr=subprocess.STDOUT)
        wait_listening(pod.netns_path, ATTACK_TARGET_PORT)
        return proc

    def requests_counted(self, node: str, service: str) -> float:
        """nodeproxy's istio_requests_total (reporter=source) on the node's daemon for
        requests to that destination service, every response code and flag summed."""
        total = 0.0
        for family in text_string_to_metric_families(self.cluster.metrics(node)):
            for sample in family.samples:
                if (sample.name == "istio_requests_total"
                        and sample.labels.get("reporter") == "source"
                        and sample.labels.get("destination_service_name") == service):
                    total += sample.value
        return total

    # -- addresses ------------------------------------------------------------

    def service(self, path: NetPath, kind: ServerKind) -> Service:
        return self.cluster.services[f"default/{service_name(path.node, kind)}"]

    def pod(self, name: str) -> Pod:
        return self.cluster.pods[name]

    def process_ids(self) -> list[int]:
        """Every process the run started that is still known: servers, HAProxy, daemons."""
        c = self.cluster
        pids = [proc.pid for pod in c.pods.values() for proc in pod.processes]
        pids += [n.daemon.pid for n in c.nodes.values() if n.daemon is not None]
        return sorted(set(pids))

    def daemon_logs(self) -> dict[str, str]:
        out = {}
        for node in NODES:
            with contextlib.suppress(KeyError):
                out[node] = self.cluster.daemon_output(node, 3000)
        return out
