"""How an enrolled pod's connections are steered to the proxy's listeners, per capture mode.

Enrollment opens a pod's listeners, then asks the steering to steer the pod; on the way
out it releases the pod before the listeners close.  The daemon hands the steering the
identity-free denies it compiles from the policy (nodeproxy.policy.kernel_rules).

- ``EbpfSteering`` (``capture.mode: ebpf``): outbound connects of every pod in the
  kernel's pods map (Enrollment writes it) are captured by cgroup/connect4/6; inbound,
  the pod's netns gets the sk_lookup program and its IPs and 15006 listeners go into
  the inbound maps.  Denies go into connect_denies: connect() fails with EPERM, counted
  per policy by the kernel.  Probe sources (inbound.probeSources) go into probe_sources:
  sk_lookup leaves their connections to the pod's own sockets.
- ``IptablesSteering`` (``capture.mode: iptables``): the pod's netns gets the rules of
  nodeproxy.capture.iptables.  Denies are REJECT rules in the pod's own deny chain:
  connect() fails with ECONNREFUSED, and no per-policy count is kept.  The kernel counts
  no captured connection either, so the proxy counts each one it accepts (the
  ``captured`` and ``inbound_captured`` fields of the pod's counters).  Probe sources
  are RETURN rules ahead of the inbound REDIRECT; a change rewrites each pod's rules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from nodeproxy.capture import iptables
from nodeproxy.capture.constants import POD_NO_IPV6
from nodeproxy.capture.maps import CaptureMaps, IPNetwork, PodCounters
from nodeproxy.capture.programs import CapturePrograms
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.policy.kernel_rules import KernelDeny
from nodeproxy.tcp.dial import DialAnnouncer

log = logging.getLogger(__name__)


class Steering(Protocol):
    announcer: DialAnnouncer
    # The proxies call these for each connection they accept from the pod (None: the
    # kernel counts them itself).
    on_outbound: Callable[[EnrolledPod], None] | None
    on_inbound: Callable[[EnrolledPod], None] | None

    async def steer(self, pod: EnrolledPod, inbound: dict[int, socket.socket]) -> None: ...
    async def release(self, pod: EnrolledPod, netns_gone: bool) -> None: ...
    def replace_denies(self, denies: Sequence[KernelDeny], policy_names: Sequence[str],
                       pods: Mapping[int, EnrolledPod]) -> None: ...
    def replace_probe_sources(self, networks: Sequence[IPNetwork],
                              pods: Mapping[int, EnrolledPod]) -> None: ...
    def policy_denials(self) -> dict[int, int]: ...
    def counters(self, kernel: dict[int, PodCounters]) -> dict[int, PodCounters]: ...


class EbpfSteering:
    def __init__(self, programs: CapturePrograms, maps: CaptureMaps):
        self._programs = programs
        self._maps = maps
        self.announcer: DialAnnouncer = maps
        self.on_outbound: Callable[[EnrolledPod], None] | None = None
        self.on_inbound: Callable[[EnrolledPod], None] | None = None
        self._probe_sources: tuple[IPNetwork, ...] | None = None  # as written

    async def steer(self, pod: EnrolledPod, inbound: dict[int, socket.socket]) -> None:
        self._programs.attach_netns(pod.key, pod.netns.fd)
        self._maps.set_inbound(pod.pod_id, list(pod.workload.ips), inbound)

    async def release(self, pod: EnrolledPod, netns_gone: bool) -> None:
        self._maps.clear_inbound(pod.pod_id, list(pod.workload.ips))
        self._programs.detach_netns(pod.key)

    def replace_denies(self, denies: Sequence[KernelDeny], policy_names: Sequence[str],
                       pods: Mapping[int, EnrolledPod]) -> None:
        self._maps.replace_denies([(d.source_pod_id, d.ip, d.port, d.policy) for d in denies])

    def replace_probe_sources(self, networks: Sequence[IPNetwork],
                              pods: Mapping[int, EnrolledPod]) -> None:
        """The kernel's probe_sources map (shared by every pod) follows the config; written
        only when it changed (each new mesh snapshot calls this)."""
        wanted = tuple(networks)
        if wanted != self._probe_sources:
            self._maps.replace_probe_sources(wanted)
            self._probe_sources = wanted

    def policy_denials(self) -> dict[int, int]:
        return self._maps.policy_denials()

    def counters(self, kernel: dict[int, PodCounters]) -> dict[int, PodCounters]:
        return kernel


class _NoAnnouncer:
    """Nothing to announce: the proxy's transparent dials carry TRANSPARENT_MARK, which the
    pod's rules let pass."""

    def expect_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        pass

    def forget_dial(self, source: tuple[str, int], dest: tuple[str, int]) -> None:
        pass


_ZERO = PodCounters(**{f.name: 0 for f in dataclasses.fields(PodCounters)})


class IptablesSteering:
    def __init__(self, ports: iptables.Ports):
        self._ports = ports
        self.announcer: DialAnnouncer = _NoAnnouncer()
        self.on_outbound: Callable[[EnrolledPod], None] | None = self._count_outbound
        self.on_inbound: Callable[[EnrolledPod], None] | None = self._count_inbound
        self._denies: dict[int, frozenset[iptables.DenyRule]] = {}  # wanted, by pod id
        self._applied: dict[str, frozenset[iptables.DenyRule]] = {}  # in the pod, by key
        self._probe_sources: tuple[IPNetwork, ...] = ()
        self._outbound: Counter[int] = Counter()
        self._inbound: Counter[int] = Counter()

    @staticmethod
    def _families(pod: EnrolledPod) -> tuple[iptables.Family, ...]:
        # Without an IPv6 loopback there is no [::1]:15001 to redirect to.
        return (iptables.IPV4,) if pod.flags & POD_NO_IPV6 else iptables.FAMILIES

    async def steer(self, pod: EnrolledPod, inbound: dict[int, socket.socket]) -> None:
        denies = self._denies.get(pod.pod_id, frozenset())
        await asyncio.to_thread(iptables.install, pod.netns.fd, f"pod {pod.key}", self._ports,
                                self._families(pod), denies, self._probe_sources)
        self._applied[pod.key] = denies

    async def release(self, pod: EnrolledPod, netns_gone: bool) -> None:
        self._applied.pop(pod.key, None)
        self._outbound.pop(pod.pod_id, None)
        self._inbound.pop(pod.pod_id, None)
        if not netns_gone:  # the rules went with the namespace
            await asyncio.to_thread(iptables.remove, pod.netns.fd, f"pod {pod.key}")

    def replace_denies(self, denies: Sequence[KernelDeny], policy_names: Sequence[str],
                       pods: Mapping[int, EnrolledPod]) -> None:
        """Rewrite the deny chain of each steered pod whose denies changed (blocking, a few
        milliseconds per changed pod; most reloads change none)."""
        wanted: dict[int, set[iptables.DenyRule]] = {}
        for d in denies:
            name = policy_names[d.policy] if d.policy < len(policy_names) else str(d.policy)
            wanted.setdefault(d.source_pod_id, set()).add(iptables.DenyRule(d.ip, d.port, name))
        self._denies = {pod_id: frozenset(rules) for pod_id, rules in wanted.items()}
        for pod_id, pod in pods.items():
            rules = self._denies.get(pod_id, frozenset())
            if pod.key not in self._applied or self._applied[pod.key] == rules:
                continue
            try:
                iptables.set_denies(pod.netns.fd, f"pod {pod.key}", rules, self._families(pod))
            except iptables.IptablesError as e:
                log.error("identity-free denies not applied: %s", e)
                continue
            self._applied[pod.key] = rules

    def replace_probe_sources(self, networks: Sequence[IPNetwork],
                              pods: Mapping[int, EnrolledPod]) -> None:
        """Rewrite the capture rules of every steered pod when the probe sources changed
        (blocking, a few milliseconds per pod; only a reload that changes
        inbound.probeSources does it)."""
        wanted = tuple(networks)
        if wanted == self._probe_sources:
            return
        self._probe_sources = wanted
        for pod in pods.values():
            if pod.key not in self._applied:
                continue
            try:
                iptables.install(pod.netns.fd, f"pod {pod.key}", self._ports,
                                 self._families(pod), self._applied[pod.key], wanted)
            except iptables.IptablesError as e:
                log.error("probe sources not applied: %s", e)

    def policy_denials(self) -> dict[int, int]:
        return {}  # REJECT rules keep their own counters (iptables -L -v in the pod)

    def counters(self, kernel: dict[int, PodCounters]) -> dict[int, PodCounters]:
        merged = dict(kernel)
        for pod_id in set(self._outbound) | set(self._inbound):
            merged[pod_id] = dataclasses.replace(
                kernel.get(pod_id, _ZERO), captured=self._outbound[pod_id],
                inbound_captured=self._inbound[pod_id])
        return merged

    def _count_outbound(self, pod: EnrolledPod) -> None:
        self._outbound[pod.pod_id] += 1

    def _count_inbound(self, pod: EnrolledPod) -> None:
        self._inbound[pod.pod_id] += 1
