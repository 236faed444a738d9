"""The upgrade handover: a new instance of the daemon takes the node over from the running
one, and no connection is refused meanwhile (README, "Operating it").

The new instance, at start, finds another one answering on the control socket
(`instance_alive`).  It leaves the pins alone (they are the running instance's), attaches
its own programs beside the old ones on the same pinned maps, opens its listeners
(SO_REUSEPORT) and enrolls its pods, then asks the old instance to hand over
(`Handover.take_over`: `POST /v1/handover`) and removes from the kernel the pods its own
configuration no longer lists.  If it fails to start before that, it removes only what is
its own (`abort_takeover`): the pods, maps, pins and routing stay the running instance's.

The old instance, asked to hand over (`hand_over`), stops accepting, detaches its
programs, stops its background work (nothing more is written to the shared maps), leaves
its admin ports and control socket to the new instance and drains its connections; while
they drain it still reads the node file, and a new version's policies judge them again
(the lifecycle's `_judge_draining`: a DENY put in force during an upgrade resets what it
refuses on both instances); then
it stays, idle, until told to stop (`stop_after_handover`): in a DaemonSet a container that
exited by itself would be restarted and take the node back.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

from nodeproxy.admin import control_client
from nodeproxy.admin.server import AdminServers
from nodeproxy.capture.maps import PodMaps
from nodeproxy.daemon.wiring import Kernel
from nodeproxy.pods.enrollment import Enrollment
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.tunnel.client import HbonePool

log = logging.getLogger(__name__)

ALIVE_TIMEOUT = 3.0  # seconds a running instance has to answer GET /v1/pods
HANDOVER_TIMEOUT = 30.0  # ... and POST /v1/handover


class HandoverRefused(Exception):
    """This instance cannot hand over (it is not running the node, or already did)."""


class Stoppable(Protocol):
    """What the handover stops besides the kernel side: the Kubernetes API watch."""

    async def stop(self) -> None: ...


async def _control(socket_path: str, method: str, path: str, timeout: float
                   ) -> tuple[int, Any]:
    """One request to a daemon's control socket: (status, the JSON answer or its text).
    The standard library's client in a thread (rare: at start and at a handover), so the
    daemon loads no HTTP client of its own; bounded by ``timeout`` in all."""
    return await asyncio.wait_for(asyncio.to_thread(
        control_client.request, socket_path, method, path,
        {} if method == "POST" else None, timeout), timeout)


async def instance_alive(control_socket: str) -> bool:
    """Is a daemon answering on this control socket (one to take over from)?"""
    if not os.path.exists(control_socket):
        return False
    try:
        status, _ = await _control(control_socket, "GET", "/v1/pods", ALIVE_TIMEOUT)
    except (OSError, http.client.HTTPException, TimeoutError):
        return False
    return status == 200


def close_listeners(enrollment: Enrollment | None, inbound: bool = True) -> None:
    """Stop accepting: every pod's outbound and tunnel listeners, and its inbound ones."""
    for pod in enrollment.pods.values() if enrollment is not None else ():
        for server in pod.listeners + (pod.inbound_listeners if inbound else []):
            server.close()


class Handover:
    """Where this instance stands in an upgrade, and the steps of both sides."""

    def __init__(self, *, node: str, control_socket: str, admin: AdminServers,
                 tracker: ConnectionTracker, drain_seconds: float):
        self._node = node
        self._control_socket = control_socket
        self._admin = admin
        self._tracker = tracker
        self._drain_seconds = drain_seconds
        self.taking_over = False  # another instance ran the node when this one started
        self.took_over = False  # ... and handed it over to this one
        self.handed_over = False  # this instance handed the node to a new one
        self._drain_task: asyncio.Task[None] | None = None

    async def detect(self) -> bool:
        """At start: is another instance running the node?  Then this one takes over."""
        self.taking_over = await instance_alive(self._control_socket)
        if self.taking_over:
            log.info("another instance of node %s is running: taking over from it", self._node)
        return self.taking_over

    # -- the new instance ------------------------------------------------------------------

    async def take_over(self, maps: PodMaps, enrollment: Enrollment) -> None:
        """Ask the running instance to hand over: it stops accepting and detaches its
        programs, then drains; our listeners (SO_REUSEPORT) and programs are already in
        place, on the same pinned maps, so no connection is refused meanwhile."""
        status, answer = await _control(self._control_socket, "POST", "/v1/handover",
                                        HANDOVER_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"the running instance refused to hand over: {answer}")
        self.took_over = True
        log.info("took over from the previous instance (%s connections left to drain there)",
                 answer.get("openConnections"))
        ours = {p.netns_cookie for p in enrollment.pods.values()}
        for cookie, pod_id in maps.enrolled().items():
            if cookie not in ours:  # a pod the new configuration no longer lists
                maps.unenroll(cookie, pod_id)

    async def abort_takeover(self, enrollment: Enrollment | None, kernel: Kernel | None,
                             pool: HbonePool | None, discovery: Stoppable | None,
                             tasks: Sequence[asyncio.Task[Any]]) -> None:
        """Starting beside a running instance failed: remove only what is ours (listeners,
        links); the pods, maps, pins and routing are the running instance's."""
        log.error("taking over failed; the running instance keeps the node")
        close_listeners(enrollment)
        for task in tasks:
            task.cancel()
        await close_own_beside_another(kernel, pool, discovery)

    # -- the old instance ------------------------------------------------------------------

    def hand_over(self, enrollment: Enrollment, kernel: Kernel,
                  tasks: Sequence[asyncio.Task[Any]]) -> int:
        """A new instance takes over: stop accepting, detach our programs, then drain (in
        the background).  Returns the connections left to drain."""
        if self.handed_over:
            raise HandoverRefused("not running")
        self.handed_over = True
        for task in tasks:
            task.cancel()  # no vanished-pod or reload work on the shared maps any more
        close_listeners(enrollment)
        if kernel.programs is not None:
            kernel.programs.detach()
        # The discovery watch stays until the stop (stop_after_handover): the API's
        # relabels judge the connections drained here, as the node file's versions do.
        open_connections = len(self._tracker.relays)
        log.info("handed over to a new instance; draining %d connections, then idle until "
                 "stopped", open_connections)
        # Our admin, metrics and readiness ports are the new instance's now.
        self._drain_task = asyncio.create_task(self._drain())
        return open_connections

    async def _drain(self) -> None:
        await self._admin.stop(unlink_control_socket=False)
        reset = await self._tracker.drain(self._drain_seconds)
        log.info("drained after handover; %d connections were reset", reset)

    async def stop_after_handover(self, kernel: Kernel | None, pool: HbonePool | None,
                                  discovery: Stoppable | None) -> None:
        """Told to stop after the handover: finish draining, close what is ours alone."""
        if self._drain_task is not None:
            await self._drain_task
        await close_own_beside_another(kernel, pool, discovery)
        log.info("node %s: old instance stopped; the new one owns the node", self._node)


async def close_own_beside_another(kernel: Kernel | None, pool: HbonePool | None,
                                   discovery: Stoppable | None) -> None:
    """Close what is this instance's alone while another instance owns the node: its
    HBONE pool, its discovery watch, its programs (the shared pinned maps stay)."""
    if pool is not None:
        pool.close()
    if discovery is not None:
        await discovery.stop()
    if kernel is not None:
        kernel.close_programs(keep_maps=True)
