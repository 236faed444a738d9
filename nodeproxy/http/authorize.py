"""Per-request authorization at the source: the destination workload's policies, judged
here for each request (Istio's waypoint's job).

The proxy acts for the source pod: it authorizes each request with the destination's
AuthorizationPolicies itself, on the request's one meaning (request_target.py,
header_fields.py), and marks the HBONE streams it opens so the destination node does not
refuse them for rules it cannot see at L4.  Endpoints outside the mesh have no policy; a
workload no policy selects skips the check (remembered per admitter, i.e. per
configuration; the workload and that answer are looked up once per destination and
mesh snapshot).  The destination table and the admitter are the mesh snapshot's in
force (mesh/holder.py), read at each decision.

An allowed request's verdict is remembered here, in the compiled request path: keyed by
the source pod and the backend (by identity: the pod's principal and workload, whose
addresses give the source address, are checked to be the same objects), the method,
path and authority, and the values of the headers the destination's policies read --
every input of the decision (policy/admission.py's _decide_request) -- under the
destination's entry for this mesh snapshot, so a new snapshot (new policies) judges
again.  A repeat is counted as the admitter counts it and costs no interpreted call.
A denial is never remembered: each one goes through the admitter, which logs it.
"""

from __future__ import annotations

from typing import Any

from nodeproxy.codec.header_fields import joined_value
from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import Workload
from nodeproxy.http.context import RequestContext
from nodeproxy.mesh.destinations import Backend, WorkloadRef
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.mesh.upstream import source_address
from nodeproxy.owned_cache import OwnedCache
from nodeproxy.policy.admission import AdmittedRequest, Admitter
from nodeproxy.policy.authorization import DestinationWorkload

MAX_REMEMBERED_REFS = 4096  # destination workloads looked up (emptied past it)
MAX_REMEMBERED_VERDICTS = 4096  # allowed requests' verdicts (the largest pod's dropped past it)
# A remembered request's key parts above this many characters are judged each time.
MAX_VERDICT_KEY_CHARS = 2048

# The destination as looked up in one snapshot: the reference, the snapshot, its
# workload there, whether a policy selects it, and the header names its policies read.
_Known = tuple[WorkloadRef, MeshSnapshot, Workload | None, bool, tuple[str, ...]]
# An allowed verdict: the pod, its principal and workload, the backend, the snapshot it
# was judged in, the counts and the labels a repeat is counted under.  Each part is
# compared by identity, so each is kept as the object it was (the labels too: a
# compiled build unboxes a fixed-length tuple it reads and boxes a new one where an
# object is needed, which would make every repeat a miss and a new key object).
_Verdict = tuple[EnrolledPod, str, Workload, Backend, MeshSnapshot, dict[Any, int], object]


class RequestAuthorizer:
    def __init__(self, state: MeshState):
        self._state = state
        self._policed_for: Admitter | None = None
        self._policed_cache: dict[str, bool] = {}
        # Per destination workload reference (by id, the object kept beside it so an id
        # is never taken for another's): the snapshot it was looked up in, the workload
        # there and whether a policy selects it.  A new snapshot looks it up again.
        self._refs: dict[int, _Known] = {}
        # By source pod (its id; the pod itself is compared in the verdict): a pod that
        # floods the cache with distinct requests forgets its own verdicts only.
        self._verdicts: OwnedCache[_Verdict] = OwnedCache(MAX_REMEMBERED_VERDICTS)
        # The snapshot the verdicts and refs were made in: a verdict is taken only in
        # its own, and each keeps its snapshot (admitter, remembered decisions) alive,
        # so both are dropped when a new one is in force (one request per version kept
        # every old version alive before).
        self._made_in: MeshSnapshot | None = None

    def allows(self, ctx: RequestContext, backend: Backend, head: RequestHead) -> bool:
        """May the request go to backend?  (head is one line per header name, so the
        policies read each header's one value, and its path and authority are what the
        upstream gets.)"""
        ref = backend.workload
        if ref is None:
            return True
        snapshot = self._state.current
        if snapshot is not self._made_in:
            self._made_in = snapshot
            self._refs.clear()
            self._verdicts = OwnedCache(MAX_REMEMBERED_VERDICTS)
        known = self._refs.get(id(ref))  # (compared by its parts: see _Verdict)
        if known is None or known[0] is not ref or known[1] is not snapshot:
            known = self._look_up(ref, snapshot)
        workload = known[2]
        if workload is None or not known[3]:
            return True
        pod = ctx.pod
        key: tuple[object, ...] = (id(backend), head.method, head.path, head.authority,
                                   *[joined_value(head.headers, name) for name in known[4]])
        verdict = self._verdicts.get(id(pod), key)
        if verdict is not None and verdict[0] is pod and verdict[1] is pod.principal \
                and verdict[2] is pod.workload and verdict[3] is backend \
                and verdict[4] is snapshot:  # (the destination's entry: per snapshot)
            counts, counted = verdict[5], verdict[6]
            counts[counted] = counts.get(counted, 0) + 1
            return True
        admitter = snapshot.admitter
        admission, labels = admitter.judge_request(
            workload, pod.principal, source_address(pod, backend.address), backend.port,
            head)
        if admission.allowed and labels is not None and _short(key):
            tally: dict[Any, int] = admitter.request_counts
            self._verdicts.put(id(pod), key, (pod, pod.principal, pod.workload, backend,
                                              snapshot, tally, labels))
        return admission.allowed

    def admitted_as(self, ctx: RequestContext, backend: Backend, head: RequestHead
                    ) -> AdmittedRequest | None:
        """What an allowed request to backend was judged on (the inputs ``allows`` gives
        the admitter), for judging it again while its upgraded connection lasts
        (daemon/revocation.py); None for an endpoint outside the mesh (no policy)."""
        ref = backend.workload
        if ref is None:
            return None
        return AdmittedRequest.of(_workload_key(ref), ctx.pod.principal,
                                  source_address(ctx.pod, backend.address), backend.port,
                                  head)

    def _look_up(self, ref: WorkloadRef, snapshot: MeshSnapshot) -> _Known:
        workload = snapshot.table.workloads.get(_workload_key(ref))
        policed = workload is not None and self._policed(snapshot.admitter, workload)
        headers = snapshot.admitter.authorizer.headers_read(
            DestinationWorkload.of(workload)) if workload is not None and policed else ()
        if len(self._refs) >= MAX_REMEMBERED_REFS:
            self._refs.clear()
        known = self._refs[id(ref)] = (ref, snapshot, workload, policed, headers)
        return known

    def _policed(self, admitter: Admitter, workload: Workload) -> bool:
        """Does any authorization policy select the workload?  Remembered per admitter (one
        per configuration)."""
        if admitter is not self._policed_for:
            self._policed_for, self._policed_cache = admitter, {}
        key = workload.key
        policed = self._policed_cache.get(key)
        if policed is None:
            policed = bool(admitter.authorizer.applicable(DestinationWorkload.of(workload)))
            self._policed_cache[key] = policed
        return policed


def _short(key: tuple[object, ...]) -> bool:
    """Is a verdict's key small enough to remember (a long path or header is judged
    each time, so the memory held stays bounded)?"""
    return sum(len(part) for part in key if isinstance(part, str)) <= MAX_VERDICT_KEY_CHARS


def _workload_key(ref: WorkloadRef) -> str:
    return f"{ref.namespace}/{ref.name}"
