"""fastPath.spliceAfterBytes end to end: a daemon with splicing on and the shipped
threshold (64 KiB) relays a short connection without ever splicing it, and splices a
busy one once it has carried the threshold, mid-stream; both echo intact (SHA-256), and
Istio's byte series count every byte once (the relay's bytes before the promotion plus
the kernel's after it).  The in-process cases (resets, half-closes, stalled readers,
segments read in part) are in test_splice_promotion.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nodeproxy_dev.testbed.cluster import Cluster
from tests.integration.observe import metric_sum, wait_for
from tests.integration.probes import echo_checksum_script

pytestmark = pytest.mark.privileged

PORT = 7000
LABELS = {"destination_service": "web.default.svc.cluster.local"}


@pytest.fixture(scope="module")
def node() -> Iterator[Cluster]:
    with Cluster(1) as c:
        c.add_pod("node0", "client", labels={"app": "client"}, service_account="client")
        c.add_pod("node0", "web-0", labels={"app": "web"}, service_account="web")
        c.add_service("web", port=80, target_port=PORT, app_protocol="tcp")
        c.serve_peer("web-0", PORT)
        c.write_configs(overrides={"fastPath": {"splice": True}})  # the default threshold
        c.start_daemons()
        yield c


def sample(c: Cluster, name: str, **labels: str) -> float:
    return metric_sum(c.metrics("node0"), name, **labels)


def echo(c: Cluster, n: int, pace: float) -> None:
    """The peer server echoes what follows a "P": n random bytes sent in 16 KiB chunks
    `pace` seconds apart (a sender the relay keeps up with), read back and compared."""
    vip = c.services["default/web"].vip4
    client = echo_checksum_script(vip, n, pace=pace)
    out = c.run_in_pod("client", [c.python, "-c", client], timeout=120).stdout
    assert out.split() == [str(n), "True"]


def test_a_short_flow_is_relayed_and_a_busy_one_spliced_mid_stream(node: Cluster):
    flows = sample(node, "nodeproxy_splice_flows_total", event="spliced")
    kernel = sample(node, "nodeproxy_kernel_fastpath_splice_bytes_total")
    sent = sample(node, "istio_tcp_sent_bytes_total", **LABELS)
    received = sample(node, "istio_tcp_received_bytes_total", **LABELS)

    echo(node, 1000, 0.0)  # a short connection: never spliced
    assert wait_for(lambda: sample(node, "istio_tcp_sent_bytes_total", **LABELS)
                    == sent + 1000)
    assert sample(node, "nodeproxy_splice_flows_total", event="spliced") == flows
    assert sample(node, "nodeproxy_kernel_fastpath_splice_bytes_total") == kernel

    n = 4 * 1024 * 1024
    echo(node, n, 0.002)  # busy: spliced once it carried 64 KiB
    assert sample(node, "nodeproxy_splice_flows_total", event="spliced") == flows + 1
    assert sample(node, "nodeproxy_kernel_fastpath_splice_bytes_total") - kernel > n
    # Every byte counted once: the relay's before the promotion, the kernel's after.
    assert wait_for(lambda: sample(node, "istio_tcp_sent_bytes_total", **LABELS)
                    == sent + 1000 + n)
    assert sample(node, "istio_tcp_received_bytes_total", **LABELS) - received \
        == 1001 + n + 1
