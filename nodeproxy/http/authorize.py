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
"""

from __future__ import annotations

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import Workload
from nodeproxy.http.context import RequestContext
from nodeproxy.mesh.destinations import Backend, WorkloadRef
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.mesh.upstream import source_address
from nodeproxy.policy.admission import AdmittedRequest, Admitter
from nodeproxy.policy.authorization import DestinationWorkload

MAX_REMEMBERED_REFS = 4096  # destination workloads looked up (emptied past it)


class RequestAuthorizer:
    def __init__(self, state: MeshState):
        self._state = state
        self._policed_for: Admitter | None = None
        self._policed_cache: dict[str, bool] = {}
        # Per destination workload reference (by id, the object kept beside it so an id
        # is never taken for another's): the snapshot it was looked up in, the workload
        # there and whether a policy selects it.  A new snapshot looks it up again.
        self._refs: dict[int, tuple[WorkloadRef, MeshSnapshot, Workload | None, bool]] = {}

    def allows(self, ctx: RequestContext, backend: Backend, head: RequestHead) -> bool:
        """May the request go to backend?  (head is one line per header name, so the
        policies read each header's one value, and its path and authority are what the
        upstream gets.)"""
        ref = backend.workload
        if ref is None:
            return True
        snapshot = self._state.current
        known = self._refs.get(id(ref))
        if known is None or known[0] is not ref or known[1] is not snapshot:
            known = self._look_up(ref, snapshot)
        workload = known[2]
        if workload is None or not known[3]:
            return True
        admission = snapshot.admitter.admit_request(
            workload, ctx.pod.principal, source_address(ctx.pod, backend.address),
            backend.port, head)
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

    def _look_up(self, ref: WorkloadRef, snapshot: MeshSnapshot
                 ) -> tuple[WorkloadRef, MeshSnapshot, Workload | None, bool]:
        workload = snapshot.table.workloads.get(_workload_key(ref))
        policed = workload is not None and self._policed(snapshot.admitter, workload)
        if len(self._refs) >= MAX_REMEMBERED_REFS:
            self._refs.clear()
        known = self._refs[id(ref)] = (ref, snapshot, workload, policed)
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


def _workload_key(ref: WorkloadRef) -> str:
    return f"{ref.namespace}/{ref.name}"
