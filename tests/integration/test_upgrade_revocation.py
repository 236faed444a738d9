"""A WebSocket opened before a policy that denies its request is reset when that policy is
put in force (daemon/revocation.py, AdmittedRequest), at the source node (the L7 proxy
that judged the request, for a destination on its node or another) and at a destination
node that judges requests itself (listeners/inbound_hbone_l7.py).  A WebSocket the new
policy still allows goes on, every echoed byte intact (SHA-256 both ways).

The backends are the project's test server (``http_backend``: a WebSocket echo on any
path ending in /ws); the client is aiohttp in the client pod, one frame per 50 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from nodeproxy_dev.testbed.cluster import Cluster, scaled
from tests.integration.observe import metric_sum, wait_for
from tests.integration.policy_reload import reload_with

pytestmark = pytest.mark.privileged

APP = 8080
SITES = {"ws-near": "node0", "ws-far": "node1"}
ROUNDS = 200  # one frame per 50 ms: 10 s, long enough to outlive the reload
CLIENT = "cluster.local/ns/default/sa/client"


def deny_paths(*paths: str) -> list[dict[str, Any]]:
    """The policy on the WebSocket servers: the client may not use these paths.  It has
    rules on HTTP from the start, so the far node judges the streams' requests itself."""
    return [{"name": "ws-paths", "namespace": "default", "action": "DENY",
             "selector": {"app": "ws"},
             "rules": [{"from": [{"source": {"principals": [CLIENT]}}],
                        "to": [{"operation": {"paths": list(paths)}}]}]}]


BEFORE = deny_paths("/admin/*")
AFTER = deny_paths("/admin/*", "/chat/*")

WS_CLIENT = r"""
import asyncio, hashlib, json, os, sys
import aiohttp
url, rounds = sys.argv[1], int(sys.argv[2])
async def main():
    sent, got = hashlib.sha256(), hashlib.sha256()
    out = {"rounds": 0, "error": None}
    async with aiohttp.ClientSession() as s:
        try:
            async with s.ws_connect(url) as ws:
                print("open", flush=True)
                for i in range(rounds):
                    data = os.urandom(4096)
                    sent.update(data)
                    await ws.send_bytes(data)
                    msg = await ws.receive(timeout=10)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        out["error"] = f"{msg.type.name}: {msg.data!r} {msg.extra!r}"
                        break
                    got.update(msg.data)
                    out["rounds"] += 1
                    await asyncio.sleep(0.05)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    out["sent"], out["got"] = sent.hexdigest(), got.hexdigest()
    print(json.dumps(out), flush=True)
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(2) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        for pod, node in SITES.items():
            c.add_pod(node, pod, labels={"app": "ws", "site": pod}, service_account="ws")
            c.serve_http(pod, APP, pod)
            c.add_service(pod, port=80, target_port=APP, selector={"app": "ws", "site": pod},
                          app_protocol="http")
        c.write_configs(overrides={"authorizationPolicies": BEFORE})
        c.start_daemons()
        yield c


def open_ws(c: Cluster, site: str, path: str) -> subprocess.Popen[str]:
    url = f"http://{c.services[f'default/{site}'].vip4}:80{path}"
    proc = c.spawn_in_pod("client", [sys.executable, "-c", WS_CLIENT, url, str(ROUNDS)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "open" once the 101 came back
    assert first.strip() == "open", (first, proc.stdout.read(), proc.stderr and
                                     proc.stderr.read())
    return proc


def result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    lines = out.strip().splitlines()
    assert lines, err
    return json.loads(lines[-1])


def put_in_force(c: Cluster, node: str, policies: list[dict[str, Any]]) -> None:
    """The node's policies, reloaded only if its file has others (an unchanged file is no
    reload to wait for)."""
    with open(c.nodes[node].config_path) as f:
        if yaml.safe_load(f).get("authorizationPolicies") != policies:
            reload_with(c, node, policies)


def revoked(c: Cluster, node: str) -> float:
    return metric_sum(c.metrics(node), "nodeproxy_connections_revoked_total")


@pytest.mark.parametrize(("site", "judge"), [
    ("ws-near", "node0"),  # the source's L7 proxy; destination on its node
    ("ws-far", "node0"),  # the source's L7 proxy; destination on another node
    ("ws-far", "node1"),  # the destination node, judging the stream's requests itself
])
def test_a_websocket_the_new_policy_denies_is_reset_and_the_allowed_one_goes_on(
        mesh: Cluster, site: str, judge: str) -> None:
    c = mesh
    for node in c.nodes:
        put_in_force(c, node, BEFORE)
    before = {node: revoked(c, node) for node in c.nodes}
    doomed = open_ws(c, site, "/chat/ws")
    kept = open_ws(c, site, "/public/ws")
    try:
        time.sleep(1.0)  # both are exchanging frames
        reloaded_at = time.monotonic()
        reload_with(c, judge, AFTER)
        cut = result(doomed, scaled(30))
        cut_after = time.monotonic() - reloaded_at
        went_on = result(kept, scaled(60))
    finally:
        doomed.kill()
        kept.kill()
    # The denied one ended within moments of the reload, long before its rounds were done,
    # and what it got back before the cut was intact.
    assert cut["error"] is not None and cut["rounds"] < ROUNDS, cut
    assert cut_after < scaled(5), (cut, cut_after)
    # The allowed one: every round, every byte echoed intact.
    assert went_on["error"] is None and went_on["rounds"] == ROUNDS, went_on
    assert went_on["sent"] == went_on["got"]
    # Counted once, by the node that judged it again.
    assert wait_for(lambda: revoked(c, judge) == before[judge] + 1, 10), \
        c.daemon_output(judge)[-3000:]
    others = [node for node in c.nodes if node != judge]
    assert all(revoked(c, node) == before[node] for node in others)
    # And a new WebSocket on the denied path is refused at once.
    fresh = c.run_in_pod("client", [sys.executable, "-c", WS_CLIENT,
                                    f"http://{c.services[f'default/{site}'].vip4}:80/chat/ws",
                                    "1"], check=False, timeout=60)
    assert "open" not in fresh.stdout.splitlines(), fresh.stdout
