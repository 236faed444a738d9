"""nodeproxy.admin.metrics_page: a pod's scrapes share one rendering per SHARE_SECONDS,
the node's own are always fresh, and a shared page is never older than that."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nodeproxy.admin.metrics_page import SHARE_SECONDS, MetricsPage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Renders(Collector):
    """Counts how often the registry is walked (each rendering collects it once)."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.count += 1
        yield GaugeMetricFamily("renders_seen", "collections", value=self.count)


def setup() -> tuple[MetricsPage, Counter, Renders, Clock]:
    registry = CollectorRegistry()
    sent = Counter("bytes_sent", "bytes", registry=registry)
    renders = Renders()
    registry.register(renders)
    clock = Clock()
    return MetricsPage(registry, clock=clock), sent, renders, clock


def value(page: bytes, name: str) -> float:
    for line in page.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the page")


def test_a_flood_of_pod_scrapes_costs_one_rendering_per_share_window() -> None:
    page, sent, renders, clock = setup()
    for step in range(1000):  # 1000 scrapes from two pods over 5 s
        clock.now = 100.0 + step * 0.005
        page.body("10.0.0.5" if step % 2 else "10.0.0.6")
    windows = 5.0 / SHARE_SECONDS
    assert renders.count <= windows + 1
    assert page.rendered == renders.count and page.shared == 1000 - renders.count


def test_a_shared_page_is_never_older_than_the_window() -> None:
    page, sent, renders, clock = setup()
    sent.inc(10)
    assert value(page.body("10.0.0.5"), "bytes_sent_total") == 10
    sent.inc(5)
    clock.now += SHARE_SECONDS * 0.5
    assert value(page.body("10.0.0.5"), "bytes_sent_total") == 10  # shared, half a window
    clock.now += SHARE_SECONDS * 0.5  # a whole window since the rendering
    assert value(page.body("10.0.0.7"), "bytes_sent_total") == 15


def test_the_node_itself_always_gets_a_fresh_page_and_refreshes_the_shared_one() -> None:
    page, sent, renders, clock = setup()
    page.body("10.0.0.5")
    for source in ("127.0.0.1", "::1", "::ffff:127.0.0.1", ""):
        sent.inc()
        assert value(page.body(source), "bytes_sent_total") == sent._value.get()
    # the pod now shares the node's last rendering, which counted all three
    assert value(page.body("10.0.0.5"), "bytes_sent_total") == 4
    assert page.rendered == 5 and page.shared == 1


def test_a_pod_address_that_looks_like_loopback_in_another_form_is_not_the_node() -> None:
    page, _, renders, _ = setup()
    page.body("10.0.0.5")
    for source in ("::ffff:127.0.0.2", "127.0.0.2", "0.0.0.0", "localhost", "::ffff:10.0.0.5"):
        page.body(source)
    assert renders.count == 1
