"""Per-request authorization at the source: the destination workload's policies, judged
here for each request (Istio's waypoint's job).

The proxy acts for the source pod: it authorizes each request with the destination's
AuthorizationPolicies itself, on the request's one meaning (request_target.py,
header_fields.py), and marks the HBONE streams it opens so the destination node does not
refuse them for rules it cannot see at L4.  Endpoints outside the mesh have no policy; a
workload no policy selects skips the check (remembered per admitter, i.e. per
configuration).  The destination table and the admitter are the mesh snapshot's in
force (mesh/holder.py), read at each decision.
"""

from __future__ import annotations

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import Workload
from nodeproxy.http.context import RequestContext
from nodeproxy.mesh.destinations import Backend
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.upstream import source_address
from nodeproxy.policy.admission import Admitter
from nodeproxy.policy.authorization import DestinationWorkload


class RequestAuthorizer:
    def __init__(self, state: MeshState):
        self._state = state
        self._policed_for: Admitter | None = None
        self._policed_cache: dict[str, bool] = {}

    def allows(self, ctx: RequestContext, backend: Backend, head: RequestHead) -> bool:
        """May the request go to backend?  (head is one line per header name, so the
        policies read each header's one value, and its path and authority are what the
        upstream gets.)"""
        ref = backend.workload
        if ref is None:
            return True
        snapshot = self._state.current
        workload = snapshot.table.workloads.get(f"{ref.namespace}/{ref.name}")
        if workload is None:
            return True
        admitter = snapshot.admitter
        if not self._policed(admitter, workload):
            return True
        admission = admitter.admit_request(
            workload, ctx.pod.principal, source_address(ctx.pod, backend.address),
            backend.port, head)
        return admission.allowed

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
