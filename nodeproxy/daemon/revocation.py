"""Connections a new mesh state no longer allows are reset.

Every connection admitted into a local pod (same-node mesh traffic, HBONE streams,
inbound plaintext) is tracked with what its admission read (policy.admission.AdmittedAs).
When a new snapshot is put in force (a reload of the node file, a discovery update, a pod
enrolled or changed), each distinct admission is judged again by the new snapshot's
Admitter, and the connections it now refuses are reset at once, both sides: a
DENY policy applied to a pod cuts the long-lived connection that was open before it,
instead of leaving it to run for as long as its client keeps it.  ztunnel's connection
manager does the same on a policy update.  Counted in
nodeproxy_connections_revoked_total; logged once per distinct admission with the policy.

An HTTP upgrade (WebSocket) that turned into a byte relay is tracked with what its request
was admitted as (AdmittedRequest), at the source node (http/upgrade_flow.py) and at a
destination that judges requests itself (listeners/inbound_hbone_l7.py), and is judged
again as that request; its destination may be on another node (the source judges the
destination's policies), so it is looked up in the whole workload table.  Other HTTP
connections are not judged here: each request is judged against the policies in force
when it arrives.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Hashable

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.config.model import Workload
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.policy.admission import Admission, AdmittedAs, AdmittedRequest, printable
from nodeproxy.tcp.tracker import ConnectionTracker

log = logging.getLogger(__name__)


class Revocation:
    """A MeshState watcher: judge the tracked connections again, reset the refused."""

    def __init__(self, tracker: ConnectionTracker, registry: CollectorRegistry):
        self._tracker = tracker
        self.revoked = Counter(
            "nodeproxy_connections_revoked",
            "Connections into local pods, and upgraded HTTP connections (WebSocket) from "
            "them, reset because the mesh state put in force after they were admitted (a "
            "policy, a pod's labels) no longer allows them",
            registry=registry)

    def __call__(self, snapshot: MeshSnapshot) -> None:
        local: dict[str, Workload] = {p.workload.key: p.workload
                                      for p in snapshot.inputs.local_pods}
        verdicts: dict[AdmittedAs | AdmittedRequest, Admission] = {}

        def still_allowed(admitted: Hashable) -> bool:
            if isinstance(admitted, AdmittedAs):
                dest = local.get(admitted.destination)
            elif isinstance(admitted, AdmittedRequest):
                dest = local.get(admitted.destination) or \
                    snapshot.table.workloads.get(admitted.destination)
            else:
                return True
            if dest is None:
                # The pod left: its unenrollment resets its connections (a remote one: the
                # upstream's end of the connection is that node's to reset).
                return True
            verdict = verdicts[admitted] = snapshot.admitter.still_allows(admitted, dest)
            return verdict.allowed

        revoked = self._tracker.revoke(still_allowed)
        if not revoked:
            return
        self.revoked.inc(len(revoked))
        for admitted, count in Tally(revoked).items():
            assert isinstance(admitted, AdmittedAs | AdmittedRequest)
            verdict = verdicts[admitted]
            request = "" if isinstance(admitted, AdmittedAs) else (
                f" (upgraded {printable(admitted.request.method)} "
                f"{printable(admitted.request.path)})")
            log.warning("reset %d connection(s) %s (%s) -> %s:%d%s: no longer allowed by "
                        "policy %s: %s", count, admitted.source_principal or "plaintext",
                        admitted.source_ip, admitted.destination, admitted.port, request,
                        verdict.policy or "-", verdict.reason)
