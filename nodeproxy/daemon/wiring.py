"""Wiring: the parts of one node's daemon, built from its config in dependency order.

- `Telemetry.create`: the metrics registry and the recorders every part writes to.
- `start_kernel`: the capture programs (ebpf; in iptables mode sockops alone, for the
  per-pod counters, where the kernel has it) and what drives their maps: steering (ebpf
  maps or iptables rules), the splicer, the sk_msg redirect; and the node's probe SNAT
  rules (inbound.probeSnat), which follow the enrolled pods.
- `build_proxies`: identity, the HBONE pool and server, the upstream dialer, the HTTP
  layer, the outbound and inbound proxies, enrollment and runtime pods.  Every part that
  decides reads the mesh state from one holder (nodeproxy.mesh.holder); none holds a
  getter into the daemon.
- `register_collectors`: what is read from the kernel and the parts at scrape time.

Nothing here starts traffic: enrolling pods, serving the admin ports and the order of
start and stop are nodeproxy.daemon.lifecycle's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, disable_created_metrics

from nodeproxy.capture import iptables, kernelfs, probe_snat
from nodeproxy.capture.maps import CaptureMaps, NoKernelMaps, PodMaps
from nodeproxy.capture.msg_redirect import MsgRedirect
from nodeproxy.capture.programs import CapturePrograms
from nodeproxy.capture.splice import SpliceMaps
from nodeproxy.config.model import LimitSettings, NodeConfig, PodShare
from nodeproxy.daemon.revocation import Revocation
from nodeproxy.daemon.runtime_pods import RuntimePods
from nodeproxy.daemon.saved_pods import SavedPods
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.http.access_log import AccessLog
from nodeproxy.http.manager import HttpProxy
from nodeproxy.identity.certificates import CertificateManager
from nodeproxy.listeners.inbound_hbone import HboneServer
from nodeproxy.listeners.inbound_hbone_l7 import DestinationGate, GateMetrics
from nodeproxy.listeners.inbound_plaintext import InboundProxy
from nodeproxy.listeners.outbound import OutboundProxy
from nodeproxy.mesh.destinations import IPAddress
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.mesh.upstream import Upstreams
from nodeproxy.pods.enrollment import Enrollment
from nodeproxy.pods.steering import EbpfSteering, IptablesSteering, Steering
from nodeproxy.policy.admission import AdmissionMetrics
from nodeproxy.signer.node_identity import node_certificates
from nodeproxy.tcp.descriptors import BUDGET, OpenFileLimit, raise_open_file_limit
from nodeproxy.tcp.fairshare import ShareLimits, SourceShares
from nodeproxy.tcp.half_sleep import HalfNaps
from nodeproxy.tcp.relay_sleep import RelaySleepMetrics
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

log = logging.getLogger(__name__)


# -- telemetry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Telemetry:
    registry: CollectorRegistry
    proxy: ProxyMetrics
    tunnel: TunnelMetrics
    admission: AdmissionMetrics
    requests: RequestMetrics
    access_log: AccessLog
    live: LiveStats | None  # None: admin.liveStatsSeconds is 0

    @classmethod
    def create(cls, config: NodeConfig) -> Telemetry:
        disable_created_metrics()  # Istio exposes no _created series
        registry = CollectorRegistry()
        proxy = ProxyMetrics(registry)
        requests = RequestMetrics(registry)
        keep = config.admin.live_stats_seconds
        live = proxy.live = LiveStats(keep) if keep else None
        return cls(registry=registry, proxy=proxy, tunnel=TunnelMetrics(registry),
                   admission=AdmissionMetrics(registry), requests=requests,
                   access_log=AccessLog(config.http.access_log,
                                        requests.access_log_dropped),
                   live=live)


# -- each source's fair share of the proxy (tcp/fairshare.py) ---------------------------


def _pod_share(limits: PodShare) -> ShareLimits:
    return ShareLimits(max_connections=limits.max_connections,
                       connections_per_second=limits.connections_per_second,
                       connection_burst=limits.connection_burst,
                       max_requests=limits.max_requests)


@dataclass(frozen=True)
class Shares:
    pods: SourceShares  # per source pod, at its outbound listener
    nodes: SourceShares  # HBONE streams per remote node
    plaintext: SourceShares  # inbound plaintext per client address

    @classmethod
    def of(cls, limits: LimitSettings) -> Shares:
        return cls(SourceShares(_pod_share(limits.per_pod)),
                   SourceShares(ShareLimits(limits.inbound.max_streams_per_node)),
                   SourceShares(ShareLimits(limits.inbound.max_plaintext_per_source)))

    def apply(self, limits: LimitSettings) -> None:
        """New caps (a reload): they hold from the next connection on."""
        self.pods.update(_pod_share(limits.per_pod))
        self.nodes.update(ShareLimits(limits.inbound.max_streams_per_node))
        self.plaintext.update(ShareLimits(limits.inbound.max_plaintext_per_source))


# -- the process ----------------------------------------------------------------------------


def set_descriptor_budget(settings: LimitSettings) -> OpenFileLimit:
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


def open_descriptors() -> float:
    """How many descriptors the daemon has open (read at scrape time)."""
    try:
        return float(len(os.listdir("/proc/self/fd")))
    except OSError:
        return float("nan")


def pod_cgroup(config: NodeConfig) -> str:
    """The cgroup subtree whose processes are captured."""
    return config.node.pod_cgroup or kernelfs.default_pod_cgroup(kernelfs.find_cgroup2_mount())


def own_cgroup() -> str:
    """The daemon's cgroup, where ebpf mode answers SO_ORIGINAL_DST for its sockets."""
    cgroup2 = kernelfs.find_cgroup2_mount()
    own = kernelfs.own_cgroup(cgroup2)
    if os.path.realpath(own) == os.path.realpath(cgroup2):
        log.warning("the daemon runs in the root cgroup: its SO_ORIGINAL_DST program (which "
                    "passes every other getsockopt through) sees every process of this "
                    "machine; run it in a cgroup of its own")
    return own


# -- the kernel side ----------------------------------------------------------------------


@dataclass
class Kernel:
    """The capture programs and what drives their maps."""

    pod_cgroup: str
    programs: CapturePrograms | None  # None: iptables mode without sockops, or closed
    maps: PodMaps
    steering: Steering
    splicer: Splicer
    msg_redirect: MsgRedirect | None  # None without programs
    probe_snat: probe_snat.ProbeSnatKeeper

    def close_programs(self, *, keep_maps: bool = False) -> None:
        """Detach and unload our programs (once); keep_maps leaves the pinned maps to
        another instance of the node."""
        if self.programs is not None:
            self.programs.close(keep_maps=keep_maps)
            self.programs = None


def _programs(config: NodeConfig, pod_cgroup: str, own: str | None) -> CapturePrograms:
    """This capture mode's eBPF programs, not loaded yet."""
    kernelfs.ensure_bpffs(config.node.bpffs)
    return CapturePrograms(
        node=config.node.name, pod_cgroup=pod_cgroup, bpffs=config.node.bpffs,
        outbound_port=config.proxy.outbound_port, inbound_port=config.proxy.inbound_port,
        hbone_port=config.proxy.hbone_port,
        pin_links=config.capture.on_crash == "fail_closed", mode=config.capture.mode,
        own_cgroup=own)


def _load(programs: CapturePrograms, mode: str) -> None:
    """Compile and load them (in a child process: the daemon never maps bcc's LLVM), then
    attach them."""
    t0 = time.monotonic()
    child_seconds = programs.load()
    log.info("compiled and loaded %s capture programs in %.2fs (%.2fs in the loading child)",
             mode, time.monotonic() - t0, child_seconds)
    programs.attach()


def start_kernel(config: NodeConfig, pod_cgroup: str, registry: CollectorRegistry, *,
                 taking_over: bool) -> Kernel:
    """The kernel side of this capture mode.  If a step fails, what was loaded is closed
    again (the pinned maps stay when another instance shares them)."""
    keeper = _probe_snat_keeper(config, taking_over=taking_over)  # before anything loads
    programs: CapturePrograms | None = None
    try:
        if config.capture.mode == "ebpf":
            programs = _programs(config, pod_cgroup, own_cgroup())
            _load(programs, config.capture.mode)
            maps: PodMaps = CaptureMaps(programs.maps)
            steering: Steering = EbpfSteering(programs, maps)
            # Before any pod is steered: a probe is never captured, not even at start.
            steering.replace_probe_sources(config.inbound.all_probe_sources(), {})
        else:
            try:  # sockops keeps the per-pod kernel counters where it can
                programs = _programs(config, pod_cgroup, None)
                _load(programs, config.capture.mode)
                maps = CaptureMaps(programs.maps)
            except Exception as e:  # noqa: BLE001 - the loading child and the kernel raise anything
                log.warning("iptables capture runs without kernel counters (no "
                            "nodeproxy_kernel_tcp_* series; captured connections are counted "
                            "by the proxy): the sockops program could not be set up: %s", e)
                if programs is not None:
                    programs.close(keep_maps=taking_over)
                    programs = None
                maps = NoKernelMaps()
            steering = IptablesSteering(iptables.Ports(
                config.proxy.outbound_port, config.proxy.inbound_port, config.proxy.hbone_port))
        splicer = Splicer(SpliceMaps(programs.maps) if programs is not None else None,
                          SpliceMetrics(registry), enabled=config.fast_path.splice,
                          after_bytes=config.fast_path.splice_after_bytes)
        msg_redirect = None
        if programs is not None:
            msg_redirect = MsgRedirect(programs.maps)
            msg_redirect.set_enabled(config.fast_path.sk_msg)
    except BaseException:
        if programs is not None:
            programs.close(keep_maps=taking_over)
        raise
    return Kernel(pod_cgroup=pod_cgroup, programs=programs, maps=maps, steering=steering,
                  splicer=splicer, msg_redirect=msg_redirect, probe_snat=keeper)


def _probe_snat_keeper(config: NodeConfig, *, taking_over: bool) -> probe_snat.ProbeSnatKeeper:
    """The keeper of the node's probe SNAT rules.  Without inbound.probeSnat, rules an
    earlier instance left (it crashed) are removed, unless this one takes over from it."""
    missing = iptables.missing_binaries()
    if config.inbound.probe_snat is not None and missing:
        raise OSError(f"inbound.probeSnat needs {', '.join(missing)} on PATH "
                      "(apt install iptables)")
    if config.inbound.probe_snat is None and not missing and not taking_over:
        try:
            probe_snat.remove()
        except iptables.IptablesError as e:
            log.warning("could not check for probe SNAT rules left by an earlier "
                        "instance: %s", e)
    return probe_snat.ProbeSnatKeeper()


# -- the proxies ---------------------------------------------------------------------------


class _EnrolledPods:
    """The enrolled pods by IP and by name, for the parts made before the enrollment that
    holds them (it needs them to open each pod's listeners)."""

    def __init__(self) -> None:
        self.enrollment: Enrollment | None = None

    def by_ip(self, ip: IPAddress) -> EnrolledPod | None:
        return self.enrollment.by_ip.get(ip) if self.enrollment is not None else None

    def by_key(self, key: str) -> EnrolledPod | None:
        return self.enrollment.pods.get(key) if self.enrollment is not None else None


@dataclass(frozen=True)
class Proxies:
    certificates: CertificateManager | None  # None: no mesh CA configured, mTLS off
    pool: HbonePool | None
    hbone: HboneServer | None
    http: HttpProxy
    outbound: OutboundProxy
    inbound: InboundProxy
    enrollment: Enrollment
    runtime: RuntimePods


def build_proxies(config: NodeConfig, kernel: Kernel, state: MeshState,
                  telemetry: Telemetry, shares: Shares, tracker: ConnectionTracker, *,
                  on_change: Callable[[], None],
                  discovered: Callable[[], DiscoveredState | None]) -> Proxies:
    """Every proxying part, joined.  on_change: the pods changed (the mesh state is built
    again); discovered: what the Kubernetes API last said (runtime pods complete from it)."""
    cfg = config
    certificates = pool = hbone = None
    steering = kernel.steering
    if cfg.identity.ca_cert:  # with caKey, or with the signing service (identity.signer)
        certificates = node_certificates(cfg.identity, cfg.mesh.trust_domain)
        telemetry.registry.register(IdentityCollector(certificates))
        pool = HbonePool(
            certificates=certificates, trust_domain=cfg.mesh.trust_domain,
            port=cfg.proxy.hbone_port, settings=cfg.tunnel, metrics=telemetry.tunnel,
            connect_timeout=cfg.proxy.connect_timeout_seconds)
        pool.start()
    else:
        log.warning("identity.caCert not set: mTLS is off, cross-node traffic is plaintext")
    pods = _EnrolledPods()
    # Quiet relayed flows sleep, in the splicer's epoll and wheel (tcp/dormancy.py);
    # cross-node ones with their socket only (tcp/half_sleep.py).
    naps = HalfNaps(kernel.splicer.dormancy, RelaySleepMetrics(telemetry.registry))
    if certificates is not None:
        hbone = HboneServer(
            certificates=certificates, trust_domain=cfg.mesh.trust_domain,
            port=cfg.proxy.hbone_port, announcer=steering.announcer,
            handshake_timeout=cfg.tunnel.handshake_timeout_seconds,
            connect_timeout=cfg.proxy.connect_timeout_seconds,
            local_pod=pods.by_ip, state=state, tracker=tracker, metrics=telemetry.proxy,
            tunnel_metrics=telemetry.tunnel, shares=shares.nodes,
            gate=DestinationGate(
                admitter=lambda: state.current.admitter,
                settings=lambda: state.current.config.http, announcer=steering.announcer,
                connect_timeout=cfg.proxy.connect_timeout_seconds,
                metrics=GateMetrics(telemetry.registry), tracker=tracker,
                request_metrics=telemetry.requests),
            naps=naps)
    upstreams = Upstreams(
        announcer=steering.announcer, metrics=telemetry.proxy, state=state,
        local_pod=pods.by_key, pool=pool, node=cfg.node.name,
        trust_domain=cfg.mesh.trust_domain, connect_timeout=cfg.proxy.connect_timeout_seconds)
    http = HttpProxy(upstreams=upstreams, metrics=telemetry.requests, state=state,
                     tracker=tracker, trust_domain=cfg.mesh.trust_domain,
                     access_log=telemetry.access_log,
                     live=telemetry.live, tracing=Tracing(telemetry.registry, cfg.node.name),
                     tcp_metrics=telemetry.proxy, shares=shares.pods)
    outbound = OutboundProxy(
        upstreams=upstreams, http=http, metrics=telemetry.proxy, state=state,
        on_captured=steering.on_outbound, tracker=tracker, splicer=kernel.splicer,
        trust_domain=cfg.mesh.trust_domain, port=cfg.proxy.outbound_port,
        msg_redirect=kernel.msg_redirect, shares=shares.pods, naps=naps)
    inbound = InboundProxy(
        port=cfg.proxy.inbound_port, connect_timeout=cfg.proxy.connect_timeout_seconds,
        announcer=steering.announcer, state=state, tracker=tracker, splicer=kernel.splicer,
        metrics=telemetry.proxy, on_captured=steering.on_inbound, shares=shares.plaintext,
        naps=naps)
    enrollment = Enrollment(
        maps=kernel.maps, steering=steering, proxy=outbound, inbound=inbound, hbone=hbone,
        tracker=tracker, metrics=telemetry.proxy, trust_domain=cfg.mesh.trust_domain,
        pod_cgroup=kernel.pod_cgroup, on_change=on_change)
    pods.enrollment = enrollment

    def write_denies(snapshot: MeshSnapshot) -> None:
        """The kernel's deny map (or iptables DENY chains) follows each new snapshot."""
        steering.replace_denies(snapshot.denies.denies, snapshot.denies.policy_names,
                                {p.pod_id: p for p in enrollment.pods.values()})

    state.watch(write_denies, writes_kernel=True)  # after the HTTP layer's, as before
    # Connections the new state no longer allows are reset (daemon/revocation.py).
    state.watch(Revocation(tracker, telemetry.registry))

    def write_probe_sources(snapshot: MeshSnapshot) -> None:
        """Inbound capture's exemption for kubelet probes follows inbound.probeSources."""
        steering.replace_probe_sources(snapshot.config.inbound.all_probe_sources(),
                                       {p.pod_id: p for p in enrollment.pods.values()})

    state.watch(write_probe_sources, writes_kernel=True)

    def write_probe_snat(snapshot: MeshSnapshot) -> None:
        """The node's probe SNAT rules follow inbound.probeSnat and the enrolled pods."""
        settings = snapshot.config.inbound.probe_snat
        if settings is None:
            kernel.probe_snat.want(None, None, ())
            return
        kernel.probe_snat.want(settings.ipv4, settings.ipv6,
                               [ip for pod in enrollment.pods.values() for ip in pod.workload.ips])

    state.watch(write_probe_snat, writes_kernel=True)
    runtime = RuntimePods(node=cfg.node.name, enrollment=enrollment, discovered=discovered,
                          saved=SavedPods(cfg.node.state_dir, cfg.node.name),
                          on_change=on_change)
    return Proxies(certificates=certificates, pool=pool, hbone=hbone, http=http,
                   outbound=outbound, inbound=inbound, enrollment=enrollment, runtime=runtime)


def register_collectors(config: NodeConfig, kernel: Kernel, proxies: Proxies,
                        state: MeshState, telemetry: Telemetry, shares: Shares) -> None:
    """What is read at scrape time: the kernel's per-pod, per-policy and fast-path
    counters, and each pod's share of the proxy."""
    maps, steering = kernel.maps, kernel.steering

    def policy_denials() -> dict[str, int]:
        names = state.current.deny_policy_names
        return {names[i]: n for i, n in steering.policy_denials().items() if i < len(names)}

    telemetry.registry.register(PodShareCollector(shares.pods))
    telemetry.registry.register(KernelCollector(
        lambda: steering.counters(maps.pod_counters()), proxies.enrollment.names,
        policy_denials, tcp=not isinstance(maps, NoKernelMaps),
        connect_denials=config.capture.mode == "ebpf",
        fastpath=maps.fastpath_counters if isinstance(maps, CaptureMaps) else None))
