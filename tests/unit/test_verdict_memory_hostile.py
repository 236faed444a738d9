"""The remembered policy decisions (http/authorize.py, policy/admission.py over
owned_cache.py) attacked by what a hostile peer controls (review7, December 2026).

- A peer node names any source address it likes in its HBONE CONNECT's Forwarded
  header (listeners/inbound_hbone.py): grouped by that address, one node spread its
  flood over thousands of groups of one entry, so the group holding the most was a
  neighbour's, dropped again and again, and every drop scanned every group.
- A verdict keeps the snapshot it was judged in (and with it that snapshot's admitter
  and all its remembered decisions): one request per policy version kept every old
  version alive until the memory filled.
- Request denials were logged once per (destination, policy) every 10 s: one pod's
  denials held back every other pod's denial warning by the same policy.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

from nodeproxy.codec.message import RequestHead
from nodeproxy.http.authorize import RequestAuthorizer
from nodeproxy.mesh.destinations import Backend, WorkloadRef
from nodeproxy.mesh.holder import MeshState
from nodeproxy.mesh.snapshot import MeshSnapshot
from nodeproxy.policy.admission import DECISION_CACHE_LIMIT
from tests.unit.test_authorize_differential import (
    TD,
    context,
    ip,
    node_config,
    pod,
    snapshot_of,
)

OPEN_POLICY = [{"name": "open", "namespace": "default", "selector": {"app": "web"},
                "rules": [{"to": [{"operation": {"paths": ["/public/*", "/own/*"]}}]}]}]
VICTIM = f"spiffe://{TD}/ns/default/sa/client"
INTRUDER = f"spiffe://{TD}/ns/evil/sa/intruder"


class Decisions:
    """Counts the admitter's fresh decisions (a remembered one is a lookup)."""

    def __init__(self, snapshot: MeshSnapshot):
        self.calls: list[tuple[Any, ...]] = []
        admitter = snapshot.admitter
        decide = admitter._decide

        def counting(*args: Any) -> Any:
            self.calls.append(args)
            return decide(*args)

        admitter._decide = counting  # type: ignore[method-assign]


def test_a_peer_node_forging_source_addresses_cannot_evict_a_neighbours_decisions() -> None:
    """A node sends 2 x DECISION_CACHE_LIMIT distinct requests as one identity, each
    stream claiming another source address.  Another node's client keeps its remembered
    decisions (allowed and denied): its repeats are lookups, not judged afresh."""
    snapshot = snapshot_of(node_config(OPEN_POLICY))
    admitter = snapshot.admitter
    web = snapshot.table.workloads["default/web-1"]
    decisions = Decisions(snapshot)
    victim_ip = ip("10.244.1.2")
    asked = [RequestHead("GET", f"/own/{i}", "web") for i in range(3)] + [
        RequestHead("GET", "/admin", "web")]
    for head in asked:
        admitter.judge_request(web, VICTIM, victim_ip, 8080, head)
    assert len(decisions.calls) == len(asked)
    for i in range(DECISION_CACHE_LIMIT * 2):
        forged = ip(f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}")
        admitter.judge_request(web, INTRUDER, forged, 8080,
                               RequestHead("GET", f"/public/{i}", "web"))
        if i % 1024 == 1023:
            before = len(decisions.calls)
            verdicts = [admitter.judge_request(web, VICTIM, victim_ip, 8080, head)[0].allowed
                        for head in asked]
            assert verdicts == [True, True, True, False]
            assert len(decisions.calls) == before, f"judged afresh after {i + 1} forged"
    assert admitter._decisions.size <= DECISION_CACHE_LIMIT


def test_a_source_without_identity_is_still_grouped_by_its_address() -> None:
    """Plaintext (no principal): the address is all there is; two addresses are two
    owners, and one of them flooding forgets its own."""
    snapshot = snapshot_of(node_config(OPEN_POLICY))
    admitter = snapshot.admitter
    web = snapshot.table.workloads["default/web-1"]
    decisions = Decisions(snapshot)
    quiet, loud = ip("10.244.7.1"), ip("10.244.7.2")
    admitter.judge_request(web, None, quiet, 8080, RequestHead("GET", "/own/q", "web"))
    for i in range(DECISION_CACHE_LIMIT + 10):
        admitter.judge_request(web, None, loud, 8080, RequestHead("GET", f"/public/{i}", "web"))
    before = len(decisions.calls)
    admitter.judge_request(web, None, quiet, 8080, RequestHead("GET", "/own/q", "web"))
    assert len(decisions.calls) == before


def test_a_pod_cannot_keep_old_policy_versions_alive_with_one_request_each() -> None:
    """Each new snapshot (a reload, a pod enrolled anywhere on the node) made every
    remembered verdict useless (a verdict is only taken for the snapshot it was judged
    in) but kept: a pod asking one new allowed path per version kept every old snapshot,
    its mesh table, its admitter and the admitter's remembered decisions alive."""
    config = node_config(OPEN_POLICY)
    state = MeshState(snapshot_of(config))
    check = RequestAuthorizer(state)
    client = pod("client", "default", "client", ["10.244.1.2"], 1)
    old: list[weakref.ref[MeshSnapshot]] = []
    for version in range(20):
        web = state.current.table.workloads["default/web-1"]
        backend = Backend(ip("10.244.2.9"), 8080, WorkloadRef.of(web))
        assert check.allows(context(client), backend,
                            RequestHead("GET", f"/public/v{version}", "web"))
        old.append(weakref.ref(state.current))
        state.replace(snapshot_of(config))
    web = state.current.table.workloads["default/web-1"]
    backend = Backend(ip("10.244.2.9"), 8080, WorkloadRef.of(web))
    assert check.allows(context(client), backend, RequestHead("GET", "/public/now", "web"))
    assert not check.allows(context(client), backend, RequestHead("GET", "/admin", "web"))
    gc.collect()
    alive = sum(ref() is not None for ref in old)
    assert alive == 0, f"{alive} of 20 old snapshots kept alive by remembered verdicts"


def test_a_pods_denials_do_not_hold_back_another_pods_denial_warning(caplog: Any) -> None:
    """log_limit.LogLimiter keyed request denials by (destination, policy) only: a pod
    sending one denied request every 10 s took the warning, and another pod's denials by
    the same policy went to debug (counted, never named).  Each source gets its own."""
    snapshot = snapshot_of(node_config(OPEN_POLICY))
    admitter = snapshot.admitter
    web = snapshot.table.workloads["default/web-1"]
    caplog.set_level(logging.WARNING, logger="nodeproxy.policy.admission")
    for i in range(50):  # the noise
        admitter.judge_request(web, INTRUDER, ip("10.244.1.3"), 8080,
                               RequestHead("GET", f"/decoy/{i}", "web"))
    admitter.judge_request(web, VICTIM, ip("10.244.1.2"), 8080,
                           RequestHead("GET", "/admin/secrets", "web"))
    for i in range(50):  # the same source's repeats stay bounded
        admitter.judge_request(web, INTRUDER, ip(f"10.244.9.{i}"), 8080,
                               RequestHead("GET", f"/decoy/x{i}", "web"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(VICTIM in line and "/admin/secrets" in line for line in lines), lines
    assert sum(INTRUDER in line for line in lines) == 1, lines  # forged addresses: no new kinds
