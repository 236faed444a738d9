"""The node daemon: wires capture, pods, proxy, telemetry and admin together for one node.

Data flows one way: validated config -> daemon state (enrolled pods,
destination table) -> kernel maps and proxy listeners.  Start order puts the
kernel programs in place before pods are enrolled; shutdown stops accepting,
drains, then removes every attachment and pin it made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from pydantic import ValidationError

from nodeproxy.admin.control_client import request
from nodeproxy.admin.server import AdminServers
from nodeproxy.capture import iptables, kernelfs
from nodeproxy.capture.maps import CaptureMaps, NoKernelMaps, PodMaps
from nodeproxy.capture.msg_redirect import MsgRedirect
from nodeproxy.capture.programs import CapturePrograms, pin_root, remove_pins
from nodeproxy.capture.splice import SpliceMaps
from nodeproxy.config import watcher
from nodeproxy.config.changes import local_workload_changes, restart_only_changes
from nodeproxy.config.loader import ConfigError, LoadedConfig, format_path, load_config
from nodeproxy.config.model import LimitSettings, PodShare, Service, Workload
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.http.access_log import AccessLog
from nodeproxy.http.manager import HttpProxy
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.listeners.inbound_hbone import HboneServer
from nodeproxy.listeners.inbound_plaintext import InboundProxy
from nodeproxy.listeners.outbound import OutboundProxy
from nodeproxy.mesh.destinations import DestinationTable
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.mesh.upstream import Upstreams
from nodeproxy.pods.enrollment import EnrollError, Enrollment
from nodeproxy.pods.steering import EbpfSteering, IptablesSteering, Steering
from nodeproxy.policy.admission import AdmissionMetrics, Admitter
from nodeproxy.policy.kernel_rules import compile_connect_denies
from nodeproxy.tcp.descriptors import BUDGET, OpenFileLimit, raise_open_file_limit
from nodeproxy.tcp.fairshare import ShareLimits, SourceShares
from nodeproxy.tcp.splicer import SpliceMetrics, Splicer
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.identity_collector import IdentityCollector
from nodeproxy.telemetry.kernel_collector import KernelCollector
from nodeproxy.telemetry.live_stats import LiveStats
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics
from nodeproxy.telemetry.request_metrics import RequestMetrics
from nodeproxy.telemetry.share_collector import PodShareCollector
from nodeproxy.telemetry.tracing import Tracing
from nodeproxy.tunnel.client import HbonePool
from nodeproxy.tunnel.metrics import TunnelMetrics

if TYPE_CHECKING:  # the client imports kubernetes_asyncio: only when discovery is on
    from nodeproxy.discovery.kubernetes import KubernetesDiscovery

log = logging.getLogger(__name__)


def _pod_share(limits: PodShare) -> ShareLimits:
    return ShareLimits(max_connections=limits.max_connections,
                       connections_per_second=limits.connections_per_second,
                       connection_burst=limits.connection_burst,
                       max_requests=limits.max_requests)


def _set_descriptor_budget(settings: LimitSettings) -> OpenFileLimit:
    """A relayed connection holds two descriptors (four through a tunnel's both ends): take
    as many as the kernel allows, and keep the reserve out of proxied traffic's reach
    (tcp/descriptors.py)."""
    limit = raise_open_file_limit(settings.open_files)
    reserved = settings.reserved_files
    if reserved >= limit.soft // 2:
        reserved = max(limit.soft // 8, 16)
        log.warning("open-file limit %d is too low for limits.reservedFiles %d: reserving %d",
                    limit.soft, settings.reserved_files, reserved)
    BUDGET.configure(limit.soft, reserved)
    log.info("proxied connections may use descriptors below %d; %d reserved for admin, "
             "metrics, readiness, control, BPF and reloads", BUDGET.ceiling, reserved)
    return limit


def _open_descriptors() -> float:
    """How many descriptors the daemon has open (read at scrape time)."""
    try:
        return float(len(os.listdir("/proc/self/fd")))
    except OSError:
        return float("nan")


def _own_cgroup() -> str:
    """The daemon's cgroup, where ebpf mode answers SO_ORIGINAL_DST for its sockets."""
    cgroup2 = kernelfs.find_cgroup2_mount()
    own = kernelfs.own_cgroup(cgroup2)
    if os.path.realpath(own) == os.path.realpath(cgroup2):
        log.warning("the daemon runs in the root cgroup: its SO_ORIGINAL_DST program (which "
                    "passes every other getsockopt through) sees every process of this "
                    "machine; run it in a cgroup of its own")
    return own


async def _instance_alive(control_socket: str) -> bool:
    """Is a daemon answering on this control socket (one we should take over from)?"""
    if not os.path.exists(control_socket):
        return False
    try:
        status, _ = await asyncio.to_thread(request, control_socket, "GET", "/v1/pods",
                                            None, 3.0)
    except OSError:
        return False
    return status == 200


class Daemon:
    def __init__(self, loaded: LoadedConfig):
        self.loaded = loaded
        self.config = loaded.config
        disable_created_metrics()  # Istio exposes no _created series
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.tunnel_metrics = TunnelMetrics(self.registry)
        self._admission_metrics = AdmissionMetrics(self.registry)
        self._admitter = Admitter(self.config, self._admission_metrics)
        self.tracker = ConnectionTracker()
        self._ready = False
        self._balancer = PortRoundRobin()
        self._table = DestinationTable(self.config, (), self._balancer)
        self._deny_policy_names: list[str] = []
        self.certificates: CertificateManager | None = None
        self.pool: HbonePool | None = None
        self._reload_lock = asyncio.Lock()
        self._taking_over = False
        self._took_over = False
        self._handed_over = False
        self._drain_task: asyncio.Task | None = None
        self.discovery: KubernetesDiscovery | None = None
        self._discovered_state: DiscoveredState | None = None
        self._discovered: tuple[tuple[Workload, ...], tuple[Service, ...]] = ((), ())
        self._skipped: dict[str, str] = {}  # pods the API says are not meshed
        self._seen_digest = loaded.digest  # last file version applied or refused
        self._reloads = Counter(
            "nodeproxy_config_reload", "Reloads of the node policy, by result",
            ("result",), registry=self.registry)
        self._config_info = Gauge(
            "nodeproxy_config_info", "The node policy version in force (sha256 of the file)",
            ("digest",), registry=self.registry)
        self._config_info.labels(loaded.digest).set(1)
        # Each source's fair share of the proxy (tcp/fairshare.py); caps change live.
        limits = self.config.limits
        self.pod_shares = SourceShares(_pod_share(limits.per_pod))
        self.node_shares = SourceShares(ShareLimits(limits.inbound.max_streams_per_node))
        self.plaintext_shares = SourceShares(
            ShareLimits(limits.inbound.max_plaintext_per_source))
        self._open_files = Gauge(
            "nodeproxy_open_files", "The daemon's descriptor budget: limit (RLIMIT_NOFILE), "
            "reserved (never used by proxied connections), open (now)",
            ("kind",), registry=self.registry)
        self._open_files.labels("open").set_function(_open_descriptors)
        self.registry.register(PodShareCollector(self.pod_shares))
        self._state_file = (Path(self.config.node.state_dir) / self.config.node.name
                            / "runtime-pods.json")
        self._tasks: list[asyncio.Task] = []
        # Pods on other nodes registered at run time: known destinations, never captured here.
        self.remote_workloads: dict[str, Workload] = {}
        self.programs: CapturePrograms | None = None
        self.maps: PodMaps | None = None
        self.msg_redirect: MsgRedirect | None = None
        self.enrollment: Enrollment | None = None
        self.proxy: OutboundProxy | None = None
        self.splicer: Splicer | None = None
        self.request_metrics = RequestMetrics(self.registry)
        self.access_log = AccessLog(self.config.http.access_log,
                                    self.request_metrics.access_log_dropped)
        self.http: HttpProxy | None = None
        keep = self.config.admin.live_stats_seconds
        self.live = self.metrics.live = LiveStats(keep) if keep else None
        self.admin = AdminServers(
            self, clusters=lambda: self.http.clusters_view() if self.http else [],
            live=self._live_view if self.live is not None else None)
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        limit = _set_descriptor_budget(cfg.limits)
        self._open_files.labels("limit").set(limit.soft)
        self._open_files.labels("reserved").set(BUDGET.reserved)
        pod_cgroup = cfg.node.pod_cgroup or kernelfs.default_pod_cgroup(
            kernelfs.find_cgroup2_mount())
        self.pod_cgroup = pod_cgroup
        self._taking_over = await _instance_alive(cfg.admin.control_socket)
        if self._taking_over:
            log.info("another instance of node %s is running: taking over from it",
                     cfg.node.name)
        else:
            stale = remove_pins(pin_root(cfg.node.bpffs, cfg.node.name))
            if stale:
                log.warning("removed state left by an earlier instance of node %s: %s",
                            cfg.node.name, ", ".join(stale))
        if cfg.capture.mode == "ebpf":
            self.maps = maps = self._start_programs(pod_cgroup, _own_cgroup())
            assert self.programs is not None
            self.steering: Steering = EbpfSteering(self.programs, maps)
        else:
            self.maps = maps = self._kernel_counters(pod_cgroup)
            self.steering = IptablesSteering(iptables.Ports(
                cfg.proxy.outbound_port, cfg.proxy.inbound_port, cfg.proxy.hbone_port))
        self.splicer = Splicer(
            SpliceMaps(self.programs.bpf) if self.programs is not None else None,
            SpliceMetrics(self.registry), enabled=cfg.fast_path.splice)
        if self.programs is not None:
            self.msg_redirect = MsgRedirect(self.programs.bpf)
            self.msg_redirect.set_enabled(cfg.fast_path.sk_msg)
        hbone = None
        if cfg.identity.ca_cert and cfg.identity.ca_key:
            ca = MeshCA.load(cfg.identity.ca_cert, cfg.identity.ca_key, cfg.mesh.trust_domain)
            self.certificates = CertificateManager(
                ca, cfg.mesh.trust_domain, ttl_seconds=cfg.identity.cert_ttl_seconds,
                rotate_fraction=cfg.identity.rotate_at_fraction)
            self.registry.register(IdentityCollector(self.certificates))
            self._tasks.append(asyncio.create_task(self.certificates.run_rotation(
                interval=min(60.0, cfg.identity.cert_ttl_seconds / 20))))
            self.pool = HbonePool(
                certificates=self.certificates, trust_domain=cfg.mesh.trust_domain,
                port=cfg.proxy.hbone_port, settings=cfg.tunnel, metrics=self.tunnel_metrics,
                connect_timeout=cfg.proxy.connect_timeout_seconds)
            self.pool.start()
            hbone = HboneServer(
                certificates=self.certificates, trust_domain=cfg.mesh.trust_domain,
                port=cfg.proxy.hbone_port, announcer=self.steering.announcer,
                handshake_timeout=cfg.tunnel.handshake_timeout_seconds,
                connect_timeout=cfg.proxy.connect_timeout_seconds,
                local_pod=lambda ip: self.enrollment.by_ip.get(ip) if self.enrollment else None,
                admitter=lambda: self._admitter, table=lambda: self._table,
                tracker=self.tracker, metrics=self.metrics, tunnel_metrics=self.tunnel_metrics,
                http2_limits=lambda: self.config.http.http2, shares=self.node_shares)
        else:
            log.warning("identity.caCert not set: mTLS is off, cross-node traffic is plaintext")
        upstreams = Upstreams(
            announcer=self.steering.announcer, metrics=self.metrics,
            admitter=lambda: self._admitter,
            local_pod=lambda key: self.enrollment.pods.get(key) if self.enrollment else None,
            pool=self.pool, node=cfg.node.name, trust_domain=cfg.mesh.trust_domain,
            connect_timeout=cfg.proxy.connect_timeout_seconds)
        self.http = HttpProxy(upstreams=upstreams, metrics=self.request_metrics,
                              admitter=lambda: self._admitter,
                              trust_domain=cfg.mesh.trust_domain, access_log=self.access_log,
                              live=self.live,
                              tracing=Tracing(self.registry, cfg.node.name),
                              tcp_metrics=self.metrics, shares=self.pod_shares)
        self.proxy = OutboundProxy(
            upstreams=upstreams, http=self.http, metrics=self.metrics,
            table=lambda: self._table, on_captured=self.steering.on_outbound,
            tracker=self.tracker, splicer=self.splicer,
            trust_domain=cfg.mesh.trust_domain, port=cfg.proxy.outbound_port,
            msg_redirect=self.msg_redirect, shares=self.pod_shares)
        inbound = InboundProxy(
            port=cfg.proxy.inbound_port, connect_timeout=cfg.proxy.connect_timeout_seconds,
            announcer=self.steering.announcer, admitter=lambda: self._admitter,
            table=lambda: self._table, tracker=self.tracker, splicer=self.splicer,
            metrics=self.metrics, on_captured=self.steering.on_inbound,
            shares=self.plaintext_shares)
        self.enrollment = Enrollment(
            maps=maps, steering=self.steering, proxy=self.proxy, inbound=inbound, hbone=hbone,
            tracker=self.tracker, metrics=self.metrics,
            trust_domain=cfg.mesh.trust_domain, pod_cgroup=pod_cgroup,
            on_change=self._rebuild_table)
        self.registry.register(KernelCollector(
            lambda: self.steering.counters(maps.pod_counters()), self.enrollment.names,
            self._kernel_policy_denials, tcp=not isinstance(maps, NoKernelMaps),
            connect_denials=cfg.capture.mode == "ebpf",
            fastpath=maps.fastpath_counters if isinstance(maps, CaptureMaps) else None))
        if cfg.discovery.kubernetes:
            await self._start_discovery()
        for workload in cfg.local_workloads():
            try:
                await self.enrollment.enroll(workload, "config")
            except (EnrollError, OSError) as e:
                log.error("%s: could not enroll pod %s: %s", self.loaded.source, workload.key, e)
        await self._restore_runtime_pods()
        if self._taking_over:
            await self._take_over(cfg.admin.control_socket)
        a = cfg.admin
        await self.admin.start(
            admin_address=a.admin_address, admin_port=a.admin_port,
            metrics_address=a.metrics_address, metrics_port=a.metrics_port,
            readiness_port=a.readiness_port, control_socket=a.control_socket)
        self._tasks.append(asyncio.create_task(
            self.enrollment.watch_vanished(cfg.proxy.netns_check_seconds)))
        self._tasks.append(asyncio.create_task(self._close_idle_flows()))
        self._tasks.append(asyncio.create_task(watcher.watch(
            self.loaded.source, cfg.proxy.netns_check_seconds, lambda: self._seen_digest,
            lambda: self.reload("file"))))
        self._ready = True
        log.info("node %s ready: %d pods enrolled, %s capture on %s", cfg.node.name,
                 len(self.enrollment.pods), cfg.capture.mode, pod_cgroup)

    def _start_programs(self, pod_cgroup: str, own_cgroup: str | None) -> CaptureMaps:
        """Compile, load and attach this capture mode's eBPF programs."""
        cfg = self.config
        kernelfs.ensure_bpffs(cfg.node.bpffs)
        self.programs = CapturePrograms(
            node=cfg.node.name, pod_cgroup=pod_cgroup, bpffs=cfg.node.bpffs,
            outbound_port=cfg.proxy.outbound_port, inbound_port=cfg.proxy.inbound_port,
            hbone_port=cfg.proxy.hbone_port,
            pin_links=cfg.capture.on_crash == "fail_closed", mode=cfg.capture.mode,
            own_cgroup=own_cgroup)
        t0 = time.monotonic()
        self.programs.load()
        log.info("compiled and loaded %s capture programs in %.2fs", cfg.capture.mode,
                 time.monotonic() - t0)
        self.programs.attach()
        return CaptureMaps(self.programs.bpf)

    def _kernel_counters(self, pod_cgroup: str) -> PodMaps:
        """iptables mode: sockops keeps the per-pod kernel counters where it can; a kernel
        or machine without it (or without bcc) runs without them."""
        try:
            return self._start_programs(pod_cgroup, None)
        except Exception as e:  # noqa: BLE001 - bcc and the kernel raise anything
            log.warning("iptables capture runs without kernel counters (no "
                        "nodeproxy_kernel_tcp_* series; captured connections are counted by "
                        "the proxy): the sockops program could not be set up: %s", e)
            if self.programs is not None:
                self.programs.close(keep_maps=self._taking_over)
                self.programs = None
            return NoKernelMaps()

    async def stop(self) -> None:
        """Stop accepting, drain, then remove everything this daemon put in the kernel —
        or, after handing over to a new instance, only what is this instance's own."""
        self._ready = False
        if self._handed_over:
            await self._stop_after_handover()
            return
        if self._taking_over and not self._took_over:
            await self._abort_takeover()
            return
        if self.enrollment is not None:
            for pod in self.enrollment.pods.values():
                for server in pod.listeners:
                    server.close()
            reset = await self.tracker.drain(self.config.proxy.drain_seconds)
            log.info("drained; %d connections were still open and were reset", reset)
            if self.pool is not None:
                self.pool.close()
            if self.http is not None:
                self.http.close()
            await self.enrollment.unenroll_all("shutdown")
        for task in self._tasks:
            task.cancel()
        await self.admin.stop()
        self.access_log.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.programs is not None:
            self.programs.close()
            self.programs = None
        log.info("node %s stopped; capture detached and pins removed", self.config.node.name)

    # -- Kubernetes API discovery ----------------------------------------

    async def _start_discovery(self) -> None:
        from nodeproxy.discovery.kubernetes import KubernetesDiscovery

        settings = self.config.discovery
        if settings.api_server:
            self.discovery = KubernetesDiscovery(settings.api_server, self.config.node.name,
                                                 self._on_discovery, pods=settings.pods)
        else:
            self.discovery = KubernetesDiscovery.in_cluster(
                self.config.node.name, self._on_discovery, pods=settings.pods)
        await self.discovery.start()
        if not await self.discovery.wait_synced(10.0):
            log.warning("Kubernetes API not synced after 10 s; serving with the node YAML "
                        "alone until it is")

    def _on_discovery(self, state: DiscoveredState) -> None:
        self._discovered_state = state
        self._discovered = state.extras(self.config)
        if self.enrollment is not None:
            self._rebuild_table()

    def _from_api(self, workload: Workload) -> tuple[Workload, str | None]:
        """Complete a pod the CNI plugin enrolls from what the API says of it (service
        account, labels); the reason it is not meshed (opt-in/opt-out labels), if so."""
        state = self._discovered_state
        known = state.pods.get(workload.key) if state else None
        if state is None or known is None:
            return workload, None
        update: dict[str, Any] = {"labels": {**known.labels, **workload.labels}}
        if workload.service_account == "default":
            update["service_account"] = known.service_account
        workload = workload.model_copy(update=update)
        if not state.is_meshed(workload.namespace, workload.labels):
            return workload, ("not in the mesh: neither the pod nor its namespace has "
                              "dataplane-mode=ambient, or the pod opts out")
        return workload, None

    # -- upgrade: a new instance takes over from this one -----------------

    async def _take_over(self, control_socket: str) -> None:
        """Ask the running instance to hand over: it stops accepting and detaches its
        programs, then drains; our listeners (SO_REUSEPORT) and programs are already in
        place, on the same pinned maps, so no connection is refused meanwhile."""
        status, answer = await asyncio.to_thread(
            request, control_socket, "POST", "/v1/handover", {}, 30.0)
        if status != 200:
            raise RuntimeError(f"the running instance refused to hand over: {answer}")
        self._took_over = True
        log.info("took over from the previous instance (%s connections left to drain there)",
                 answer.get("openConnections"))
        assert self.enrollment is not None and self.maps is not None
        ours = {p.netns_cookie for p in self.enrollment.pods.values()}
        for cookie, pod_id in self.maps.enrolled().items():
            if cookie not in ours:  # a pod the new configuration no longer lists
                self.maps.unenroll(cookie, pod_id)

    async def _abort_takeover(self) -> None:
        """Starting beside a running instance failed: remove only what is ours (listeners,
        links); the pods, maps, pins and routing are the running instance's."""
        log.error("taking over failed; the running instance keeps the node")
        if self.enrollment is not None:
            for pod in self.enrollment.pods.values():
                for server in pod.listeners + pod.inbound_listeners:
                    server.close()
        for task in self._tasks:
            task.cancel()
        await self._close_own_beside_another()

    async def _close_own_beside_another(self) -> None:
        """Close what is this instance's alone while another instance owns the node: its
        HBONE pool, its discovery watch, its programs (the shared pinned maps stay)."""
        if self.pool is not None:
            self.pool.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.programs is not None:
            self.programs.close(keep_maps=True)
            self.programs = None

    async def handover_request(self) -> tuple[int, dict[str, Any]]:
        """A new instance takes over: stop accepting, detach our programs, then drain."""
        if self.enrollment is None or self._handed_over:
            return 409, {"error": "not running"}
        self._handed_over = True
        self._ready = False
        for task in self._tasks:
            task.cancel()  # no vanished-pod or reload work on the shared maps any more
        for pod in self.enrollment.pods.values():
            for server in pod.listeners + pod.inbound_listeners:
                server.close()
        if self.programs is not None:
            self.programs.detach()
        if self.discovery is not None:
            self._tasks.append(asyncio.create_task(self.discovery.stop()))
        open_connections = len(self.tracker.relays)
        log.info("handed over to a new instance; draining %d connections, then idle until "
                 "stopped", open_connections)
        # Our admin, metrics and readiness ports are the new instance's now.
        self._drain_task = asyncio.create_task(self._drain_after_handover())
        return 200, {"openConnections": open_connections}

    async def _drain_after_handover(self) -> None:
        await self.admin.stop(unlink_control_socket=False)
        reset = await self.tracker.drain(self.config.proxy.drain_seconds)
        log.info("drained after handover; %d connections were reset", reset)

    async def _stop_after_handover(self) -> None:
        """After a handover the process stays (idle) until it is told to stop: in a
        DaemonSet, a container that exited by itself would be restarted and take the node
        back."""
        if self._drain_task is not None:
            await self._drain_task
        await self._close_own_beside_another()
        log.info("node %s: old instance stopped; the new one owns the node", self.config.node.name)

    async def serve(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self.tracker.spawn(self.reload("sighup")))
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: draining for up to %.1fs",
                     self.config.proxy.drain_seconds)
        finally:
            await self.stop()

    # -- reload ----------------------------------------------------------

    async def reload(self, trigger: str) -> str:
        """Validate the policy file again and apply it whole, or keep the one in force.
        Returns the result: applied, unchanged or rejected."""
        if self._handed_over:
            log.info("reload (%s) ignored: this instance handed the node over", trigger)
            return "unchanged"
        async with self._reload_lock:
            result = await self._reload(trigger)
        self._reloads.labels(result).inc()
        return result

    async def _reload(self, trigger: str) -> str:
        source = self.loaded.source
        try:
            new = load_config(source, check_environment=True)
        except ConfigError as e:
            self._seen_digest = watcher.file_digest(source) or self._seen_digest
            log.error("reload (%s) of %s refused; the version in force (%s) stays:\n%s",
                      trigger, source, self.loaded.digest[:12], e)
            return "rejected"
        self._seen_digest = new.digest
        if new.digest == self.loaded.digest:
            return "unchanged"
        restart = restart_only_changes(self.config, new.config)
        if restart:
            log.error("reload (%s) of %s refused: %s changed, which takes effect only when "
                      "the daemon restarts; nothing was applied", trigger, source,
                      ", ".join(restart))
            return "rejected"
        assert self.enrollment is not None
        changes = local_workload_changes(self.config, new.config)
        old_digest = self.loaded.digest
        self.loaded, self.config = new, new.config
        # A pod whose labels or service account changed is updated in place; only a new
        # netns, cgroup or address needs it enrolled again.
        again = tuple(w for w in changes.changed if not self.enrollment.update(w))
        for w in changes.removed + again:
            await self.enrollment.unenroll(w.key, "config")
        for w in again + changes.added:
            try:
                await self.enrollment.enroll(w, "config")
            except (EnrollError, OSError) as e:
                log.error("%s: could not enroll pod %s: %s", source, w.key, e)
        # Tables, admission and the kernel's deny map switch together, in one step.
        self._rebuild_table()
        await self._apply_fast_path(changes.changed)
        if self.msg_redirect is not None:  # new connections only
            self.msg_redirect.set_enabled(new.config.fast_path.sk_msg)
        self._apply_limits()
        self._config_info.clear()
        self._config_info.labels(new.digest).set(1)
        log.info("reload (%s): %s -> %s applied (%d pods added, %d removed, %d changed)",
                 trigger, old_digest[:12], new.digest[:12], len(changes.added),
                 len(changes.removed), len(changes.changed))
        return "applied"

    async def _close_idle_flows(self) -> None:
        """limits.tcpIdleTimeoutSeconds, checked a few times per timeout (live on reload)."""
        while True:
            timeout = self.config.limits.tcp_idle_timeout_seconds
            await asyncio.sleep(min(5.0, max(0.25, timeout / 4)))
            closed = self.tracker.close_idle(self.config.limits.tcp_idle_timeout_seconds,
                                             time.monotonic())
            if closed:
                self.metrics.tcp_idle_closed.inc(closed)
                log.info("closed %d relayed TCP flows idle for %.0fs", closed,
                         self.config.limits.tcp_idle_timeout_seconds)

    def _apply_limits(self) -> None:
        limits = self.config.limits
        self.pod_shares.update(_pod_share(limits.per_pod))
        self.node_shares.update(ShareLimits(limits.inbound.max_streams_per_node))
        self.plaintext_shares.update(ShareLimits(limits.inbound.max_plaintext_per_source))

    async def _apply_fast_path(self, changed: tuple[Workload, ...]) -> None:
        """Splicing switched off (globally or for a pod): the kernel gives those flows back."""
        splicer = self.splicer
        assert splicer is not None
        splicer.enabled = self.config.fast_path.splice
        opted_out = {w.key for w in changed if not w.splice}
        taken = await splicer.take_back(
            lambda flow: not splicer.enabled or bool(opted_out.intersection(flow.pods)))
        if taken:
            log.info("took %d spliced flows back from the kernel", taken)

    # -- pods enrolled at run time survive restarts -----------------------

    def _save_runtime_pods(self) -> None:
        if self.enrollment is None:
            return
        pods = [p.workload.model_dump(mode="json", by_alias=True, exclude_none=True)
                for p in self.enrollment.pods.values() if p.source == "runtime"]
        pods += [w.model_dump(mode="json", by_alias=True, exclude_none=True)
                 for w in self.remote_workloads.values()]
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pods, indent=1))
        os.replace(tmp, self._state_file)

    async def _restore_runtime_pods(self) -> None:
        try:
            saved = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("%s: cannot read pods enrolled before the restart: %s",
                      self._state_file, e)
            return
        for item in saved:
            status, answer = await self.enroll_request(item, persist=False)
            if status != 200:
                log.warning("pod enrolled before the restart not restored: %s", answer)
        self._save_runtime_pods()

    # -- state -----------------------------------------------------------

    def _rebuild_table(self) -> None:
        assert self.enrollment is not None
        if self._handed_over:
            return  # the shared maps are the new instance's to write
        # Discovered pods first: a pod enrolled here (with its netns) replaces its copy.
        runtime = self._discovered[0] + tuple(
            p.workload for p in self.enrollment.pods.values() if p.source == "runtime"
        ) + tuple(self.remote_workloads.values())
        config = self.config
        if self._discovered[1]:
            config = config.model_copy(
                update={"services": [*config.services, *self._discovered[1]]})
        self._table = DestinationTable(config, runtime, self._balancer)
        if self.http is not None:
            self.http.update(config, self._table, frozenset(self.enrollment.pods))
        workloads = {w.key: w for w in config.workloads}
        workloads.update({w.key: w for w in runtime})
        self._admitter = Admitter(self.config, self._admission_metrics)
        compiled = compile_connect_denies(
            self.config, self._admitter.authorizer,
            [(p.pod_id, p.workload) for p in self.enrollment.pods.values()],
            list(workloads.values()), config.services)
        self.steering.replace_denies(compiled.denies, compiled.policy_names,
                                     {p.pod_id: p for p in self.enrollment.pods.values()})
        self._deny_policy_names = compiled.policy_names

    def _kernel_policy_denials(self) -> dict[str, int]:
        counts = self.steering.policy_denials() if self.enrollment is not None else {}
        return {self._deny_policy_names[i]: n for i, n in counts.items()
                if i < len(self._deny_policy_names)}

    # -- admin view (nodeproxy.admin.server.DaemonView) -----------------

    def is_ready(self) -> bool:
        return self._ready

    def _live_view(self, window: int | None, namespace: str | None) -> dict[str, Any]:
        """/stats/live: the live figures of this node's proxy."""
        assert self.live is not None
        return {"node": self.config.node.name, **self.live.snapshot(window, namespace)}

    def config_dump(self) -> dict[str, Any]:
        return {
            "source": self.loaded.source,
            "digest": self.loaded.digest,
            "loadedAt": self.loaded.loaded_at,
            "podCgroup": getattr(self, "pod_cgroup", None),
            "config": self.config.model_dump(mode="json", by_alias=True),
            "runtimeWorkloads": [
                p.workload.model_dump(mode="json", by_alias=True)
                for p in (self.enrollment.pods.values() if self.enrollment else [])
                if p.source == "runtime"
            ] + [w.model_dump(mode="json", by_alias=True)
                 for w in self.remote_workloads.values()],
        }

    def pod_view(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        key = f"{namespace}/{name}"
        if key in self._skipped:
            return 200, {"skipped": key, "reason": self._skipped[key]}
        for pod in self.pods_view():
            if f"{pod['namespace']}/{pod['name']}" == key:
                return 200, pod
        return 404, {"error": f"pod {key} is not enrolled"}

    def pods_view(self) -> list[dict[str, Any]]:
        if self.enrollment is None:
            return []
        return [
            {
                "namespace": p.workload.namespace,
                "name": p.workload.name,
                "workload": p.ref.workload,
                "serviceAccount": p.workload.service_account,
                "principal": p.principal,
                "ips": [str(ip) for ip in p.workload.ips],
                "netns": p.workload.netns,
                "cgroup": p.workload.cgroup,
                "podId": p.pod_id,
                "netnsCookie": p.netns_cookie,
                "source": p.source,
            }
            for p in self.enrollment.pods.values()
        ]

    async def enroll_request(self, body: Any, persist: bool = True
                             ) -> tuple[int, dict[str, Any]]:
        if self.enrollment is None:
            return 503, {"error": "daemon is not started"}
        try:
            workload = Workload.model_validate(body)
        except ValidationError as e:
            problems = [f"{format_path(tuple(err['loc']))}: {err['msg']}" for err in e.errors()]
            return 400, {"error": "invalid pod", "problems": problems}
        workload, not_meshed = self._from_api(workload)
        if not_meshed:
            self._skipped[workload.key] = not_meshed
            log.info("pod %s not enrolled: %s", workload.key, not_meshed)
            return 200, {"skipped": workload.key, "reason": not_meshed}
        if workload.node not in (None, self.config.node.name):
            # A pod on another node: a destination this node must know, nothing to capture.
            self.remote_workloads[workload.key] = workload
            self._rebuild_table()
            if persist:
                self._save_runtime_pods()
            return 200, {"registered": workload.key, "node": workload.node}
        try:
            pod = await self.enrollment.enroll(workload, "runtime")
        except EnrollError as e:
            return 409, {"error": str(e)}
        except OSError as e:
            return 400, {"error": f"pod {workload.key}: {e}"}
        if persist:
            self._save_runtime_pods()
        return 200, {"enrolled": pod.key, "podId": pod.pod_id}

    async def unenroll_request(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        if self.enrollment is None:
            return 503, {"error": "daemon is not started"}
        key = f"{namespace}/{name}"
        if self._skipped.pop(key, None) is not None:
            return 200, {"unenrolled": key, "wasSkipped": True}
        if self.remote_workloads.pop(key, None) is not None:
            self._rebuild_table()
            self._save_runtime_pods()
            return 200, {"unregistered": key}
        if await self.enrollment.unenroll(key, "request"):
            self._save_runtime_pods()
            return 200, {"unenrolled": key}
        return 404, {"error": f"pod {key} is not enrolled"}
