"""Enrolling and unenrolling pods: listeners first, then the kernel maps, and the reverse.

Order matters: a pod's connects are captured as soon as its netns cookie is in
the kernel's pods map (ebpf) or its REDIRECT rules are in place (iptables), so its
15001 listener must already exist; its inbound traffic is steered once its IPs are
in the inbound map (or its rules are), so the 15006 listener and the netns's
transparent-reply routing must exist before that.  On the way out the map entries
and rules go first, so nothing new is steered to a closing listener.  What steering
means in each capture mode is nodeproxy.pods.steering's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from nodeproxy.capture import transparent
from nodeproxy.capture.maps import NoKernelMaps, PodMaps
from nodeproxy.capture.namespaces import Netns
from nodeproxy.config.model import Workload
from nodeproxy.identity.spiffe import spiffe_id
from nodeproxy.listeners.inbound_hbone import HboneServer
from nodeproxy.listeners.inbound_plaintext import InboundProxy
from nodeproxy.listeners.outbound import OutboundProxy
from nodeproxy.mesh.destinations import WorkloadRef
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.pods.steering import Steering
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.proxy_metrics import ProxyMetrics

log = logging.getLogger(__name__)


class EnrollError(ValueError):
    """A pod cannot be enrolled; the message names the pod and the reason."""


class Enrollment:
    def __init__(
        self,
        *,
        maps: PodMaps,
        steering: Steering,
        proxy: OutboundProxy,
        inbound: InboundProxy,
        hbone: HboneServer | None,
        tracker: ConnectionTracker,
        metrics: ProxyMetrics,
        trust_domain: str,
        pod_cgroup: str,
        on_change: Callable[[], None],
    ):
        self._maps = maps
        self._steering = steering
        self._proxy = proxy
        self._inbound = inbound
        self._hbone = hbone
        self._tracker = tracker
        self._metrics = metrics
        self._trust_domain = trust_domain
        self._pod_cgroup = os.path.realpath(pod_cgroup)
        self._on_change = on_change
        self.pods: dict[str, EnrolledPod] = {}
        self.by_ip: dict = {}
        self._lock = asyncio.Lock()

    def names(self) -> dict[int, tuple[str, str]]:
        return {p.pod_id: (p.workload.namespace, p.workload.name) for p in self.pods.values()}

    async def enroll(self, workload: Workload, source: str) -> EnrolledPod:
        async with self._lock:
            return await self._enroll(workload, source)

    async def _enroll(self, workload: Workload, source: str) -> EnrolledPod:
        existing = self.pods.get(workload.key)
        if existing is not None:
            if existing.workload == workload:
                return existing  # enrolling twice is a no-op (CNI may retry ADD)
            raise EnrollError(f"pod {workload.key} is already enrolled with other settings")
        self._check(workload)
        assert workload.netns is not None
        try:
            netns = Netns.open(workload.netns)
        except OSError as e:
            raise EnrollError(f"pod {workload.key}: netns {workload.netns}: {e.strerror}") from e
        pod: EnrolledPod | None = None
        steered = False
        try:
            cookie = netns.pod_key(kernel_keeps_pods=not isinstance(self._maps, NoKernelMaps))
            for other in self.pods.values():
                if other.netns_cookie == cookie:
                    raise EnrollError(
                        f"pod {workload.key}: netns {workload.netns} is already the netns of "
                        f"pod {other.key}")
            pod = EnrolledPod(
                workload=workload,
                ref=WorkloadRef.of(workload),
                principal=spiffe_id(self._trust_domain, workload.namespace,
                                    workload.service_account),
                pod_id=self._pod_id(cookie),
                netns=netns,
                netns_cookie=cookie,
                source=source,
            )
            await asyncio.to_thread(transparent.prepare, netns)
            await self._proxy.open_listeners(pod)
            inbound = await self._inbound.open_listeners(pod)
            if self._hbone is not None:
                await self._hbone.open_listeners(pod)
            steered = True
            await self._steering.steer(pod, inbound)
        except BaseException:
            if pod is not None and steered:
                try:
                    await self._steering.release(pod, netns_gone=False)
                except Exception as e:  # noqa: BLE001 - the enroll error is the one to raise
                    log.error("pod %s: steering not undone: %s", workload.key, e)
            for server in (pod.listeners + pod.inbound_listeners) if pod is not None else []:
                server.close()
            netns.close()
            raise
        self._maps.enroll(cookie, pod.pod_id, pod.flags)
        self.pods[pod.key] = pod
        for ip in workload.ips:
            self.by_ip[ip] = pod
        self._metrics.enrolled_pods.set(len(self.pods))
        self._metrics.pod_enrollments.labels("enroll", source).inc()
        log.info("enrolled pod %s (id %d, netns %s)", pod.key, pod.pod_id, workload.netns)
        self._on_change()
        return pod

    def update(self, workload: Workload) -> bool:
        """Apply new settings of an enrolled pod in place when its netns, cgroup and IPs
        are unchanged (labels, service account): its listeners, kernel entries and open
        connections are untouched.  False when it must be enrolled again."""
        pod = self.pods.get(workload.key)
        if pod is None:
            return False
        old = pod.workload
        if (old.netns, old.cgroup, old.ips) != (workload.netns, workload.cgroup, workload.ips):
            return False
        pod.workload = workload
        pod.ref = WorkloadRef.of(workload)
        pod.principal = spiffe_id(self._trust_domain, workload.namespace,
                                  workload.service_account)
        self._on_change()
        return True

    def _pod_id(self, cookie: int) -> int:
        """The pod's id in the kernel maps: the one it already has there (an instance we
        took over from enrolled it), else the smallest id unused by us and the kernel —
        ids index fixed-size kernel maps, so they are reused."""
        kernel = self._maps.enrolled()
        ours = {p.pod_id for p in self.pods.values()}
        if cookie in kernel and kernel[cookie] not in ours:
            return kernel[cookie]
        used = ours | set(kernel.values())
        return next(i for i in range(1, len(used) + 2) if i not in used)

    def _check(self, workload: Workload) -> None:
        if not workload.netns or not workload.cgroup:
            raise EnrollError(f"pod {workload.key}: netns and cgroup are required")
        cgroup = os.path.realpath(workload.cgroup)
        if not os.path.isdir(cgroup):
            raise EnrollError(f"pod {workload.key}: cgroup {workload.cgroup} does not exist")
        if os.path.commonpath([cgroup, self._pod_cgroup]) != self._pod_cgroup:
            raise EnrollError(
                f"pod {workload.key}: cgroup {workload.cgroup} is outside this node's pod "
                f"cgroup {self._pod_cgroup}, so its traffic could not be captured")
        ips = set(workload.ips)
        for other in self.pods.values():
            shared = ips & set(other.workload.ips)
            if shared:
                raise EnrollError(
                    f"pod {workload.key}: IP {', '.join(map(str, sorted(shared, key=str)))} "
                    f"already belongs to pod {other.key}")

    async def unenroll(self, key: str, cause: str) -> bool:
        async with self._lock:
            pod = self.pods.pop(key, None)
            if pod is None:
                return False
            self._maps.unenroll(pod.netns_cookie, pod.pod_id)
            try:
                await self._steering.release(pod, netns_gone=cause == "netns_vanished")
            except Exception as e:  # noqa: BLE001 - the pod may be going away
                log.error("pod %s: steering not removed: %s", key, e)
            for ip in pod.workload.ips:
                self.by_ip.pop(ip, None)
            for server in pod.listeners + pod.inbound_listeners:
                server.close()
            pod.listeners.clear()
            pod.inbound_listeners.clear()
            if cause == "netns_vanished":
                self._tracker.abort_pod(pod.key)
            else:
                try:
                    await asyncio.to_thread(transparent.undo, pod.netns)
                except Exception as e:  # noqa: BLE001 - the pod may be going away
                    log.info("pod %s: transparent routing not removed: %s", key, e)
            pod.netns.close()
            self._metrics.enrolled_pods.set(len(self.pods))
            self._metrics.pod_enrollments.labels("unenroll", cause).inc()
            log.info("unenrolled pod %s (%s)", key, cause)
            self._on_change()
            return True

    async def unenroll_all(self, cause: str) -> None:
        for key in list(self.pods):
            await self.unenroll(key, cause)

    async def watch_vanished(self, interval: float) -> None:
        """Unenroll pods whose network namespace disappeared (pod deleted without DEL)."""
        while True:
            await asyncio.sleep(interval)
            for pod in list(self.pods.values()):
                if pod.netns.vanished():
                    log.warning("netns %s of pod %s vanished; unenrolling",
                                pod.workload.netns, pod.key)
                    await self.unenroll(pod.key, "netns_vanished")
