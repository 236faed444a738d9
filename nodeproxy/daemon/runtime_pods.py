"""Pods enrolled and unenrolled at run time (the CNI plugin, `nodeproxy enroll`): the
domain operations behind the control socket, with typed results and errors (what HTTP
status each becomes is nodeproxy.daemon.control_api's business).

- A pod on this node is enrolled: listeners, steering, kernel maps
  (nodeproxy.pods.enrollment).  With Kubernetes discovery on, what the CNI plugin sends is
  completed from the API first (labels, service account).
- A pod the API says is not meshed (Istio's opt-in/opt-out labels) is only remembered as
  skipped, so `GET /v1/pods/{ns}/{name}` can say why.
- A pod on another node is registered: a destination this node must know, nothing to
  capture here.

Every change is saved (nodeproxy.daemon.saved_pods) and restored at start, pod by pod:
one that cannot be restored is logged and the others still are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from nodeproxy.config.loader import format_path
from nodeproxy.config.model import Workload
from nodeproxy.daemon.saved_pods import SavedPods
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.mesh.snapshot import RUNTIME
from nodeproxy.pods.enrollment import EnrollError, Enrollment

log = logging.getLogger(__name__)

NOT_MESHED = ("not in the mesh: neither the pod nor its namespace has "
              "dataplane-mode=ambient, or the pod opts out")


@dataclass(frozen=True)
class Enrolled:
    """Enrolled on this node (or already was, with the same settings)."""

    key: str
    pod_id: int


@dataclass(frozen=True)
class Registered:
    """A pod on another node, now a known destination."""

    key: str
    node: str


@dataclass(frozen=True)
class Skipped:
    """Not meshed, by its labels or its namespace's: nothing done."""

    key: str
    reason: str


EnrollResult = Enrolled | Registered | Skipped


@dataclass(frozen=True)
class Unenrolled:
    key: str
    was: str  # "enrolled", "registered" (another node's pod) or "skipped"


class InvalidPod(ValueError):
    """A pod description that is not a valid workload; `problems` name each field."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid pod: " + "; ".join(problems))
        self.problems = problems


class PodSetupFailed(Exception):
    """The kernel refused a step of setting the pod up (its netns, listeners, routing)."""


class NotEnrolled(LookupError):
    """No pod of that name is enrolled, registered or skipped here."""

    def __init__(self, key: str):
        super().__init__(f"pod {key} is not enrolled")
        self.key = key


def parse_workload(body: Any) -> Workload:
    """A pod as the control socket and the saved file carry it; InvalidPod if it is not."""
    try:
        return Workload.model_validate(body)
    except ValidationError as e:
        raise InvalidPod([f"{format_path(tuple(err['loc']))}: {err['msg']}"
                          for err in e.errors()]) from e


def complete_from_api(workload: Workload, state: DiscoveredState | None
                      ) -> tuple[Workload, str | None]:
    """Complete a pod the CNI plugin enrolls from what the API says of it (its labels under
    the plugin's, the API's service account unless the plugin named one); the reason it is
    not meshed, if so.  Unchanged when discovery does not know the pod."""
    known = state.pods.get(workload.key) if state else None
    if state is None or known is None:
        return workload, None
    update: dict[str, Any] = {"labels": {**known.labels, **workload.labels}}
    if workload.service_account == "default":
        update["service_account"] = known.service_account
    workload = workload.model_copy(update=update)
    if not state.is_meshed(workload.namespace, workload.labels):
        return workload, NOT_MESHED
    return workload, None


class RuntimePods:
    def __init__(self, *, node: str, enrollment: Enrollment,
                 discovered: Callable[[], DiscoveredState | None], saved: SavedPods,
                 on_change: Callable[[], None]):
        self._node = node
        self._enrollment = enrollment
        self._discovered = discovered
        self._saved = saved
        self._on_change = on_change  # the remote pods changed: the mesh state follows
        self.skipped: dict[str, str] = {}  # namespace/name -> why it is not meshed
        self.remote: dict[str, Workload] = {}  # pods on other nodes, by namespace/name
        # Pods enrolled here at run time as the plugin sent them (before the API completed
        # them), so the API's later labels can be followed (follow_api).
        self._as_sent: dict[str, Workload] = {}

    def workloads(self) -> list[Workload]:
        """Every pod enrolled or registered at run time, as saved."""
        return [p.workload for p in self._enrollment.pods.values() if p.source == RUNTIME] \
            + list(self.remote.values())

    async def enroll(self, workload: Workload, *, persist: bool = True,
                     sent: Workload | None = None) -> EnrollResult:
        """Enroll, register or skip the pod.  Raises EnrollError (it conflicts with an
        enrolled pod, or its cgroup or netns is not acceptable) or PodSetupFailed.
        `sent`: a restored pod as the plugin sent it, `workload` as it was saved (what
        the API then said): the API completes `sent` again when it knows the pod (a label
        it took off meanwhile stays off), else the pod is enrolled as saved."""
        state = self._discovered()
        if sent is None:
            sent = workload
        elif state is not None and sent.key in state.pods:
            workload = sent
        workload, not_meshed = complete_from_api(workload, state)
        if not_meshed:
            self.skipped[workload.key] = not_meshed
            log.info("pod %s not enrolled: %s", workload.key, not_meshed)
            return Skipped(workload.key, not_meshed)
        if workload.node not in (None, self._node):
            self.remote[workload.key] = workload
            self._on_change()
            if persist:
                self.save()
            return Registered(workload.key, workload.node)
        try:
            pod = await self._enrollment.enroll(workload, RUNTIME)
        except OSError as e:
            raise PodSetupFailed(f"pod {workload.key}: {e}") from e
        self._as_sent[pod.key] = sent
        # A discovery update while the kernel was set up found no pod to follow (it is in
        # _as_sent only now): a relabel then would wait for the next update, however late.
        self._follow(pod.key, sent, self._discovered())
        if persist:
            self.save()
        return Enrolled(pod.key, pod.pod_id)

    async def unenroll(self, namespace: str, name: str) -> Unenrolled:
        """Forget a skipped pod, unregister another node's pod or unenroll one of ours;
        NotEnrolled if the name is none of these."""
        key = f"{namespace}/{name}"
        if self.skipped.pop(key, None) is not None:
            return Unenrolled(key, "skipped")
        if self.remote.pop(key, None) is not None:
            self._on_change()
            self.save()
            return Unenrolled(key, "registered")
        self._as_sent.pop(key, None)
        if await self._enrollment.unenroll(key, "request"):
            self.save()
            return Unenrolled(key, "enrolled")
        raise NotEnrolled(key)

    def follow_api(self) -> None:
        """The API's labels of the pods enrolled here at run time, followed on each
        discovery update: a relabel (kubectl label) reaches the policies' selectors and the
        judgement of open connections, as a relabel in the node file does.  Before, a pod
        kept the labels it was enrolled with.  Only the labels (under the plugin's own, as
        at enrollment); a pod restored after a restart counts its saved labels as the
        plugin's, so there only labels the API adds are followed (unless it was saved with
        the plugin's labels, ``labelsSent``: then as for any other pod)."""
        state = self._discovered()
        if state is None:
            return
        for key, sent in list(self._as_sent.items()):
            self._follow(key, sent, state)

    def _follow(self, key: str, sent: Workload, state: DiscoveredState | None) -> None:
        """One pod of follow_api: its labels as the API now completes what was sent."""
        pod = self._enrollment.pods.get(key)
        if pod is None or pod.source != RUNTIME:
            self._as_sent.pop(key, None)
            return
        if state is None or key not in state.pods:
            return
        completed, _ = complete_from_api(sent, state)
        if completed.labels != pod.workload.labels:
            log.info("pod %s relabelled in the API: %s", key, completed.labels)
            self._enrollment.update(pod.workload.model_copy(
                update={"labels": completed.labels}))

    def save(self) -> None:
        """The pods in force, each enrolled one with the labels the plugin sent when the API
        added others (so a restart follows the API from the plugin's labels, not from
        labels the API may take off while this daemon is down)."""
        sent = {key: w.labels for key, w in self._as_sent.items()
                if (pod := self._enrollment.pods.get(key)) is not None
                and pod.workload.labels != w.labels}
        self._saved.save(self.workloads(), sent)

    async def restore(self) -> None:
        """Enroll again the pods saved before a restart; one that fails is logged."""
        for item in self._saved.load():
            try:
                sent_labels = item.pop("labelsSent", None) if isinstance(item, dict) else None
                workload = parse_workload(item)
                sent = None if sent_labels is None else \
                    parse_workload({**item, "labels": sent_labels})
                await self.enroll(workload, persist=False, sent=sent)
            except (InvalidPod, EnrollError, PodSetupFailed) as e:
                log.warning("pod enrolled before the restart not restored: %s", e)
        self.save()
