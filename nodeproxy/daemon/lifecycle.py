"""The node daemon's lifecycle: start, serve, reload, hand over, stop — in that order of
parts, each of which lives in its own module of this package.

Start puts the kernel programs in place before pods are enrolled, and enrolls before the
admin ports and the control socket answer (`/ready` turns 200 last).  Every change of what
the node knows (the node file, the Kubernetes API, pods enrolled or registered at run
time) builds one new mesh snapshot (nodeproxy.state) and puts it in force in one step.
Stop stops accepting, drains, then removes every attachment and pin this instance made —
or, after handing the node over to a new instance, only what is its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from nodeproxy import native
from nodeproxy.admin.server import AdminServers
from nodeproxy.capture.programs import pin_root, remove_pins
from nodeproxy.config import watcher
from nodeproxy.config.changes import WorkloadChanges
from nodeproxy.config.loader import LoadedConfig
from nodeproxy.config.model import NodeConfig
from nodeproxy.daemon import cyclic_gc, memory_trim, views
from nodeproxy.daemon.control_api import ControlApi
from nodeproxy.daemon.handover import Handover, HandoverRefused, close_listeners
from nodeproxy.daemon.reload import ConfigReloader, apply_config
from nodeproxy.daemon.wiring import (
    Kernel,
    Proxies,
    Shares,
    Telemetry,
    build_proxies,
    open_descriptors,
    pod_cgroup,
    register_collectors,
    set_descriptor_budget,
    start_kernel,
)
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.round_robin import PortRoundRobin
from nodeproxy.mesh.snapshot import LocalPod, MeshInputs, MeshSnapshot, build_snapshot
from nodeproxy.pods.enrollment import EnrollError
from nodeproxy.tcp.descriptors import BUDGET
from nodeproxy.tcp.tracker import ConnectionTracker

if TYPE_CHECKING:  # the client imports kubernetes_asyncio: only when discovery is on
    from nodeproxy.discovery.kubernetes import KubernetesDiscovery

log = logging.getLogger(__name__)

# How long start-up waits for the first probe SNAT rules before /ready turns 200 anyway
# (a failed write keeps being retried; its error is logged).
PROBE_SNAT_READY_SECONDS = 10.0


class Daemon:
    def __init__(self, loaded: LoadedConfig):
        config = loaded.config
        self.telemetry = Telemetry.create(config)
        self.registry = self.telemetry.registry  # what /metrics serves
        self.metrics = self.telemetry.proxy
        self.tracker = ConnectionTracker()
        self.shares = Shares.of(config.limits)  # each source's fair share; caps change live
        self.reloader = ConfigReloader(loaded, self.registry)
        self._balancer = PortRoundRobin()  # round-robin positions outlive each snapshot
        self.state = MeshState(self._build(MeshInputs(config)))
        self._discovered: DiscoveredState | None = None  # the API's last snapshot
        self.discovery: KubernetesDiscovery | None = None
        self.kernel: Kernel | None = None  # set by start
        self.proxies: Proxies | None = None  # set by start
        self._tasks: list[asyncio.Task[Any]] = []
        self._file_watch: asyncio.Task[Any] | None = None
        self._ready = False
        self._open_files = Gauge(
            "nodeproxy_open_files", "The daemon's descriptor budget: limit (RLIMIT_NOFILE), "
            "reserved (never used by proxied connections), open (now)",
            ("kind",), registry=self.registry)
        self._open_files.labels("open").set_function(open_descriptors)
        self._trimmer = memory_trim.MemoryTrimmer(
            memory_trim.MemoryTrimMetrics(self.registry), memory_trim.glibc_trim())
        self._gc_pauses = cyclic_gc.register_gc_metrics(self.registry)
        self.admin = AdminServers(
            self, clusters=self._clusters_view,
            live=self._live_view if self.telemetry.live is not None else None)
        self.handover = Handover(
            node=config.node.name, control_socket=config.admin.control_socket,
            admin=self.admin, tracker=self.tracker, drain_seconds=config.proxy.drain_seconds)
        self.started_at = time.time()

    @property
    def loaded(self) -> LoadedConfig:
        """The node file version in force."""
        return self.reloader.loaded

    @property
    def config(self) -> NodeConfig:
        return self.reloader.loaded.config

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        limit = set_descriptor_budget(cfg.limits)
        self._open_files.labels("limit").set(limit.soft)
        self._open_files.labels("reserved").set(BUDGET.reserved)
        cgroup = pod_cgroup(cfg)
        if not await self.handover.detect():
            stale = remove_pins(pin_root(cfg.node.bpffs, cfg.node.name))
            if stale:
                log.warning("removed state left by an earlier instance of node %s: %s",
                            cfg.node.name, ", ".join(stale))
        self.kernel = kernel = start_kernel(cfg, cgroup, self.registry,
                                            taking_over=self.handover.taking_over)
        self.proxies = proxies = build_proxies(
            cfg, kernel, self.state, self.telemetry, self.shares, self.tracker,
            on_change=self._publish, discovered=lambda: self._discovered)
        if proxies.certificates is not None:
            self._tasks.append(asyncio.create_task(proxies.certificates.run_rotation(
                interval=min(60.0, cfg.identity.cert_ttl_seconds / 20))))
        register_collectors(cfg, kernel, proxies, self.state, self.telemetry, self.shares)
        if cfg.discovery.kubernetes:
            await self._start_discovery()
        for workload in cfg.local_workloads():
            try:
                await proxies.enrollment.enroll(workload, "config")
            except (EnrollError, OSError) as e:
                log.error("%s: could not enroll pod %s: %s", self.loaded.source, workload.key, e)
        await proxies.runtime.restore()
        if self.handover.taking_over:
            await self.handover.take_over(kernel.maps, proxies.enrollment)
        control = ControlApi(pods=self.pods_view, runtime=proxies.runtime,
                             hand_over=self._hand_over)
        a = cfg.admin
        await self.admin.start(
            admin_address=a.admin_address, admin_port=a.admin_port,
            metrics_address=a.metrics_address, metrics_port=a.metrics_port,
            readiness_port=a.readiness_port, control_socket=a.control_socket,
            control=control.app())
        self._tasks.append(asyncio.create_task(
            proxies.enrollment.watch_vanished(cfg.proxy.netns_check_seconds)))
        self._tasks.append(asyncio.create_task(self._close_idle_flows()))
        # Connections that came and went, and sockets that fell asleep or woke (a sleep
        # frees the flow's transports): a burst of either leaves freed heap to give back.
        dormancy = kernel.splicer.dormancy
        if cfg.proxy.memory_trim_seconds and not self._trimmer.unavailable:
            dormancy.settled = self._trimmer.settled  # a burst of sleeps is over: trim
        self._tasks.append(asyncio.create_task(memory_trim.run(
            self._trimmer, lambda: self.tracker.churn, cfg.proxy.memory_trim_seconds,
            lambda: dormancy.churn)))
        # Not one of _tasks: after a handover the file is still read, to judge again the
        # connections draining here.
        self._file_watch = asyncio.create_task(watcher.watch(
            self.loaded.source, cfg.proxy.netns_check_seconds,
            lambda: self.reloader.seen_digest, lambda: self.reload("file")))
        # kubelet probes the pods from the moment the node is ready: their rules first.
        try:
            await asyncio.wait_for(kernel.probe_snat.settled(), PROBE_SNAT_READY_SECONDS)
        except TimeoutError:
            log.error("inbound.probeSnat: the rules are not written after %.0fs; ready "
                      "without them", PROBE_SNAT_READY_SECONDS)
        cyclic_gc.freeze_start_up()
        self._ready = True
        log.info("node %s ready: %d pods enrolled, %s capture on %s", cfg.node.name,
                 len(proxies.enrollment.pods), cfg.capture.mode, cgroup)
        why = native.state()[1]
        log.info("L7 request path: %s (%d of %d modules loaded compiled)", why,
                 len(native.loaded_compiled()), len(native.NATIVE_MODULES))

    async def stop(self) -> None:
        """Stop accepting, drain, then remove everything this daemon put in the kernel —
        or, after handing over to a new instance, only what is this instance's own."""
        self._ready = False
        if self._file_watch is not None:
            self._file_watch.cancel()
        proxies = self.proxies
        pool = proxies.pool if proxies is not None else None
        if self.handover.handed_over:
            await self.handover.stop_after_handover(self.kernel, pool, self.discovery)
            return
        if self.handover.taking_over and not self.handover.took_over:
            await self.handover.abort_takeover(
                proxies.enrollment if proxies is not None else None, self.kernel, pool,
                self.discovery, self._tasks)
            return
        if proxies is not None:
            # Inbound listeners stay open while draining: STRICT holds (nothing reaches a
            # pod's application around the proxy) until the pod is unenrolled.
            close_listeners(proxies.enrollment, inbound=False)
            reset = await self.tracker.drain(self.config.proxy.drain_seconds)
            log.info("drained; %d connections were still open and were reset", reset)
            if pool is not None:
                pool.close()
            proxies.http.close()
            await proxies.enrollment.unenroll_all("shutdown")
        for task in self._tasks:
            task.cancel()
        await self.admin.stop()
        self.telemetry.access_log.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.kernel is not None:
            await self.kernel.probe_snat.close()
            self.kernel.close_programs()
        log.info("node %s stopped; capture detached and pins removed", self.config.node.name)

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

    # -- the mesh state --------------------------------------------------------------------

    def _build(self, inputs: MeshInputs) -> MeshSnapshot:
        return build_snapshot(inputs, admission_metrics=self.telemetry.admission,
                              balancer=self._balancer)

    def _publish(self) -> None:
        """What the node knows changed: put the mesh state built from it in force."""
        proxies = self.proxies
        if proxies is None:
            return  # not started
        # After a handover the watchers that write the kernel's shared state are no
        # longer called (MeshState.hand_kernel_over); the revocation still is.
        self.state.replace(self._build(MeshInputs(
            config=self.config, discovered=self._discovered,
            local_pods=tuple(LocalPod(p.pod_id, p.workload, p.source)
                             for p in proxies.enrollment.pods.values()),
            remote_workloads=tuple(proxies.runtime.remote.values()))))

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, trigger: str) -> str:
        """Validate the node file again and apply it whole, or keep the version in force
        (nodeproxy.daemon.reload).  Returns the result: applied, unchanged or rejected.
        After a handover only the judgement of the connections still draining here
        follows the new version (`_judge_draining`)."""
        if self.handover.handed_over:
            return await self.reloader.reload(trigger, self._judge_draining)
        return await self.reloader.reload(trigger, self._apply_config)

    async def _apply_config(self, config: NodeConfig, changes: WorkloadChanges) -> None:
        assert self.proxies is not None and self.kernel is not None
        await apply_config(config, changes, source=self.loaded.source,
                           enrollment=self.proxies.enrollment, kernel=self.kernel,
                           shares=self.shares, publish=self._publish)

    async def _judge_draining(self, config: NodeConfig, changes: WorkloadChanges) -> None:
        """A new version of the node file while this instance drains after a handover:
        the pods and the kernel are the new instance's to change, but the connections
        still open here are judged by the new policies (and the pods' new labels) and
        the ones refused are reset, as the new instance does with its own; requests on
        HTTP connections still open here are judged by them too.  Pods the file no longer
        lists keep their connections here until the drain ends."""
        assert self.proxies is not None
        for workload in changes.changed:
            self.proxies.enrollment.update(workload)  # labels in place, or nothing
        self._publish()
        log.info("draining after handover: the open connections were judged again by "
                 "the new version of %s", self.loaded.source)

    # -- Kubernetes API discovery ----------------------------------------------------------

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
        self._discovered = state
        if self.proxies is not None:
            self.proxies.runtime.follow_api()  # relabels of pods enrolled here
        self._publish()

    # -- upgrade: a new instance takes over from this one ----------------------------------

    async def _hand_over(self) -> int:
        """POST /v1/handover (nodeproxy.daemon.handover)."""
        if self.proxies is None or self.kernel is None:
            raise HandoverRefused("not running")
        open_connections = self.handover.hand_over(
            self.proxies.enrollment, self.kernel, self._tasks)
        self.state.hand_kernel_over()
        self._ready = False
        return open_connections

    # -- admin view (nodeproxy.admin.server.DaemonView) ------------------------------------

    def is_ready(self) -> bool:
        return self._ready

    def ready_detail(self) -> list[str]:
        """Lines /ready adds below its verdict: the mesh signer's state, when one is used."""
        certificates = self.proxies.certificates if self.proxies is not None else None
        status = certificates.signer_status() if certificates is not None else None
        return [f"signer: {status}"] if status is not None else []

    def config_dump(self) -> dict[str, Any]:
        return views.config_dump(
            self.loaded, self.kernel.pod_cgroup if self.kernel is not None else None,
            self.proxies.runtime.workloads() if self.proxies is not None else ())

    def pods_view(self) -> list[dict[str, Any]]:
        if self.proxies is None:
            return []
        return [views.pod_view(p) for p in self.proxies.enrollment.pods.values()]

    def _clusters_view(self) -> Sequence[Mapping[str, Any]]:
        return self.proxies.http.clusters_view() if self.proxies is not None else []

    def _live_view(self, window: int | None, namespace: str | None) -> dict[str, Any]:
        """/stats/live: the live figures of this node's proxy."""
        assert self.telemetry.live is not None
        return {"node": self.config.node.name,
                **self.telemetry.live.snapshot(window, namespace)}
