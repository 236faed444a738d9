"""Simulated clusters several test files start the same way."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from nodeproxy_dev.testbed.cluster import Cluster


@contextlib.contextmanager
def two_zone_mesh(client: str, port: int) -> Iterator[Cluster]:
    """Two nodes, daemons running: `client` and web-0 (zone z0) on node0, web-1 (zone z1)
    on node1, each web pod serving the testbed peer on `port`; services web-z0 and web-z1
    (port 80) reach one zone each: same node and cross node from the client."""
    with Cluster(2) as c:
        c.add_pod("node0", client, labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-0", labels={"app": "web", "zone": "z0"}, service_account="web")
        c.add_pod("node1", "web-1", labels={"app": "web", "zone": "z1"}, service_account="web")
        c.add_service("web-z0", port=80, target_port=port, selector={"zone": "z0"})
        c.add_service("web-z1", port=80, target_port=port, selector={"zone": "z1"})
        for name in ("web-0", "web-1"):
            c.serve_peer(name, port)
        c.write_configs()
        c.start_daemons()
        yield c
