"""Request authorization decisions are remembered per configuration (policy/admission.py):
a reload that changes the policy must decide the very next request -- on a client
connection kept open across the reload, with its upstream connection pooled -- by the
new policy, and a request the new policy denies must never reach the backend (its own
request log says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum

pytestmark = pytest.mark.privileged

APP = 8080
CLIENT_SA = "cluster.local/ns/default/sa/client"

# One request per line read from stdin ("METHOD PATH"), on one kept-alive connection;
# one line out per request: the status and the backend that answered ("-" for none).
CLIENT = """
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], timeout=10)
for line in sys.stdin:
    method, path = line.split()
    conn.request(method, path)
    r = conn.getresponse()
    r.read()
    print(r.status, r.getheader("x-backend") or "-", flush=True)
"""


def policy(paths: list[str]) -> dict[str, Any]:
    return {"name": "web-l7", "namespace": "default", "selector": {"app": "web"},
            "action": "ALLOW", "rules": [
                {"from": [{"source": {"principals": [CLIENT_SA]}}],
                 "to": [{"operation": {"methods": ["GET"], "paths": paths}}]}]}


def configure(c: Cluster, paths: list[str], *, reload: bool) -> None:
    c.write_configs(overrides={"authorizationPolicies": [policy(paths)]})
    if reload:
        c.reload_daemons()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web", labels={"app": "web"}, service_account="web")
        c.serve_http("web", APP, None, "--log", os.path.join(c.dir, "web-requests.log"))
        c.add_service("web", port=80, target_port=APP, app_protocol="http")
        configure(c, ["/public*"], reload=False)
        c.start_daemons()
        yield c


def backend_saw(c: Cluster, path: str) -> int:
    with open(os.path.join(c.dir, "web-requests.log")) as f:
        return sum(json.loads(line)["path"].split("?")[0] == path for line in f if line.strip())


class KeptAlive:
    """The client pod's one connection to the web service."""

    def __init__(self, c: Cluster):
        address = c.services["default/web"].address(4)
        self.proc = c.spawn_in_pod("client", [sys.executable, "-c", CLIENT, address],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def get(self, path: str) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"GET {path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the client's connection ended"
        status, backend = line.split()
        return int(status), backend

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_a_reload_that_changes_the_policy_decides_the_next_request_by_the_new_policy(
        mesh: Cluster) -> None:
    client = KeptAlive(mesh)
    try:
        # Decided under the first policy, then again (the remembered decision).
        for _ in range(3):
            assert client.get("/public/a") == (200, "web")
        assert client.get("/private/b") == (403, "-")
        assert backend_saw(mesh, "/public/a") == 3
        assert backend_saw(mesh, "/private/b") == 0

        # The new policy allows /private only: the same connection's next /public/a is
        # denied and never reaches the backend; /private/b now does.
        configure(mesh, ["/private*"], reload=True)
        for _ in range(3):
            assert client.get("/public/a") == (403, "-")
        assert client.get("/private/b") == (200, "web")
        assert backend_saw(mesh, "/public/a") == 3
        assert backend_saw(mesh, "/private/b") == 1

        # And back: the first policy's verdicts again, not the second's remembered ones.
        configure(mesh, ["/public*"], reload=True)
        assert client.get("/public/a") == (200, "web")
        assert client.get("/private/b") == (403, "-")
        assert backend_saw(mesh, "/public/a") == 4
        assert backend_saw(mesh, "/private/b") == 1
    finally:
        client.close()
    # Every request was counted as a decision, remembered or not: 5 denied, 5 allowed
    # (and the upstream connections it opened, judged as checked at the source).
    metrics = mesh.metrics("node0")
    assert metric_sum(metrics, "nodeproxy_authorization_decisions_total",
                      policy="default/web-l7", result="allowed") >= 5
    assert metric_sum(metrics, "nodeproxy_authorization_decisions_total",
                      result="denied") == 5
