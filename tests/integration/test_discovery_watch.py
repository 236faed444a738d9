"""Discovery's list/watch loop and KubernetesDiscovery against a local fake API server.

No API server can run here, so tests/integration/fake_kube_api.py speaks the API's
documented list/watch protocol on 127.0.0.1 and the real client (kubernetes_asyncio, the
loop in nodeproxy/discovery/watch.py) talks to it.  Every wait is bounded; backoff delays
are shrunk to tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api

from nodeproxy.config.model import Workload
from nodeproxy.discovery import DiscoveredState, DiscoveryUnavailable, KubernetesDiscovery
from nodeproxy.discovery.convert import pod_to_workload
from nodeproxy.discovery.watch import Backoff, ResourceWatch
from tests.integration.fake_kube_api import (
    FakeKubeApi,
    endpoint_slice,
    namespace,
    pod,
    service,
    slice_endpoint,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)
    asyncio.run(bounded())


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def fake_api(**kwargs: Any) -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi(**kwargs)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@contextlib.asynccontextmanager
async def pod_watch(api: FakeKubeApi, **kwargs: Any) -> AsyncIterator[ResourceWatch[Workload]]:
    """A running ResourceWatch of pods (kubernetes_asyncio's list method, as in the daemon)."""
    client = ApiClient(Configuration(host=api.url))
    kwargs.setdefault("backoff", Backoff(initial=0.02, cap=0.2))
    watch: ResourceWatch[Workload] = ResourceWatch(
        "pods", CoreV1Api(client).list_pod_for_all_namespaces, transform=pod_to_workload,
        **kwargs)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.synced.wait(), 5)
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def watching(api: FakeKubeApi, count: int = 1, resource: str = "pods") -> None:
    await eventually(lambda: api.watching(resource) >= count, f"{count} open {resource} watch")


# --- the loop ----------------------------------------------------------------------------

def test_initial_list_then_added_modified_deleted():
    async def scenario() -> None:
        async with fake_api() as api:
            api.put("pods", pod("a", ip="10.244.1.1"))
            api.put("pods", pod("b", ip="10.244.1.2"))
            api.put("pods", pod("starting", ip=None, phase="Pending"))  # no IP: not cached
            async with pod_watch(api, page_size=1) as w:
                assert sorted(w.items) == ["default/a", "default/b"]
                assert w.resource_version == str(api.rv)
                listed_at = w.resource_version
                lists = api.seen("pods", watch=False)
                assert [s.query.get("continue") for s in lists] == [None, "1", "2"]
                await watching(api)
                api.put("pods", pod("c", ip="10.244.1.3"))
                await eventually(lambda: "default/c" in w.items, "ADDED applied")
                api.put("pods", pod("a", ip="10.244.1.1", labels={"v": "2"}))
                await eventually(lambda: w.items["default/a"].labels == {"v": "2"},
                                 "MODIFIED applied")
                api.delete("pods", "default/b")
                await eventually(lambda: "default/b" not in w.items, "DELETED applied")
                api.put("pods", pod("starting", ip="10.244.1.9"))  # got its IP
                await eventually(lambda: "default/starting" in w.items, "IP assigned")
                api.put("pods", pod("c", ip="10.244.1.3", phase="Succeeded"))
                await eventually(lambda: "default/c" not in w.items, "finished pod dropped")
                assert w.resource_version == str(api.rv)
                assert (w.stats.events, w.stats.lists, w.stats.errors) == (5, 1, 0)
                query = api.seen("pods", watch=True)[0].query
                assert query["allowWatchBookmarks"] in ("true", "True")
                assert query["resourceVersion"] == listed_at  # the watch starts at the list
    run(scenario)


def test_bookmark_advances_the_resource_version_used_to_resume():
    async def scenario() -> None:
        async with fake_api() as api:
            api.put("pods", pod("a"))
            async with pod_watch(api) as w:
                await watching(api)
                api.put("services", service("web"))  # moves the shared resourceVersion
                api.put("services", service("db", vips=["10.96.0.11"]))
                assert w.resource_version != str(api.rv)
                api.bookmark("pods")
                await eventually(lambda: w.resource_version == str(api.rv), "bookmark")
                assert (w.stats.bookmarks, w.stats.events) == (1, 0)
                bookmarked = w.resource_version
                api.close_watches()
                await eventually(lambda: len(api.seen("pods", watch=True)) == 2, "resume")
                assert api.seen("pods", watch=True)[1].query["resourceVersion"] == bookmarked
                assert w.stats.lists == 1
    run(scenario)


def test_closed_stream_resumes_from_the_last_resource_version():
    async def scenario() -> None:
        async with fake_api() as api:
            async with pod_watch(api) as w:
                await watching(api)
                api.put("pods", pod("a", ip="10.244.1.1"))
                await eventually(lambda: "default/a" in w.items, "first event")
                last = w.resource_version
                api.close_watches()
                # A change while the client is away: the resumed watch must replay it.
                api.put("pods", pod("b", ip="10.244.1.2"))
                await eventually(lambda: "default/b" in w.items, "missed event replayed")
                resumed = api.seen("pods", watch=True)[1]
                assert resumed.query["resourceVersion"] == last
                await watching(api)
                api.put("pods", pod("c", ip="10.244.1.3"))
                await eventually(lambda: "default/c" in w.items, "live event after resume")
                assert (w.stats.resumes, w.stats.lists, w.stats.errors) == (1, 1, 0)
    run(scenario)


def test_410_gone_relists_and_replaces_the_cache():
    async def scenario() -> None:
        async with fake_api() as api:
            api.put("pods", pod("a", ip="10.244.1.1"))
            api.put("pods", pod("b", ip="10.244.1.2"))
            # min_stream_seconds=0: the stream closed below at once is not a failure here.
            async with pod_watch(api, min_stream_seconds=0) as w:
                await watching(api)
                # Changes the client never hears of, then compaction: resuming gets 410.
                api.delete("pods", "default/b", notify=False)
                api.put("pods", pod("c", ip="10.244.1.3"), notify=False)
                api.compact()
                api.close_watches()
                await eventually(lambda: w.stats.relists == 1, "relist")
                await eventually(lambda: sorted(w.items) == ["default/a", "default/c"],
                                 "cache replaced by the new list")
                assert w.stats.lists == 2 and w.stats.errors == 0
                assert w.resource_version == str(api.rv)
                kinds = ["watch" if s.watch else "list" for s in api.seen("pods")]
                assert kinds[:4] == ["list", "watch", "watch", "list"]
                # An ERROR 410 event on an open stream does the same.
                await watching(api)
                api.delete("pods", "default/a", notify=False)
                api.expire_watches("pods")
                await eventually(lambda: sorted(w.items) == ["default/c"], "second relist")
                assert w.stats.relists == 2 and w.stats.errors == 0
    run(scenario)


def test_garbage_event_lines_are_counted_and_skipped():
    async def scenario() -> None:
        async with fake_api() as api:
            async with pod_watch(api) as w:
                await watching(api)
                api.send_raw("pods", b"{this is not json\n")
                api.send_raw("pods", b'{"type": "SURPRISE", "object": {}}\n')
                api.send_raw("pods", b'["not", "an", "event"]\n')
                api.send_raw("pods", b'{"type": "ADDED", "object": {"metadata": {"name": "x"}}}'
                                     b"\n")  # no resourceVersion
                api.send_raw("pods", b"\n")  # a blank line is a keep-alive, not an event
                api.put("pods", pod("a", ip="10.244.1.1"))
                await eventually(lambda: "default/a" in w.items, "the next good event")
                assert w.stats.bad_events == 4
                assert (w.stats.watches, w.stats.errors, w.stats.events) == (1, 0, 1)
    run(scenario)


def test_objects_the_model_cannot_hold_are_left_out():
    async def scenario() -> None:
        async with fake_api() as api:
            api.put("pods", pod("web.1", ip="10.244.1.1"))  # a DNS subdomain name
            api.put("pods", pod("web-2", ip="10.244.1.2"))
            async with pod_watch(api) as w:
                assert list(w.items) == ["default/web-2"]
                await watching(api)
                api.put("pods", pod("db.1", ip="10.244.1.3"))
                api.put("pods", pod("db-2", ip="10.244.1.4"))
                await eventually(lambda: "default/db-2" in w.items, "valid pod after it")
                assert w.stats.invalid_objects == 2 and w.stats.errors == 0
    run(scenario)


def test_server_errors_back_off_then_recover():
    async def scenario() -> None:
        async with fake_api() as api:
            api.put("pods", pod("a", ip="10.244.1.1"))
            api.fail_next(3, 500)
            started = time.monotonic()
            # rng 1.0: the top of each jitter range, so delays are exactly 20, 40, 80 ms.
            async with pod_watch(api, backoff=Backoff(0.02, 0.2, rng=lambda: 1.0)) as w:
                assert time.monotonic() - started >= 0.02 + 0.04 + 0.08
                assert w.stats.errors == 3 and "500" in (w.stats.last_error or "")
                assert w.stats.last_delay == pytest.approx(0.08)
                assert "default/a" in w.items
                await watching(api)
                api.put("pods", pod("b", ip="10.244.1.2"))
                await eventually(lambda: "default/b" in w.items, "event after recovery")
                assert w.backoff.failures == 0  # a delivering watch resets the backoff
                # The watch fails next: it is retried (not relisted) from the same version.
                last = w.resource_version
                api.fail_next(2, 503)
                api.close_watches()
                await watching(api)
                api.put("pods", pod("c", ip="10.244.1.3"))
                await eventually(lambda: "default/c" in w.items, "event after 503s")
                assert w.stats.errors == 5 and w.stats.lists == 1
                assert w.stats.last_delay == pytest.approx(0.04)  # restarted from 20 ms
                retries = api.seen("pods", watch=True)[-3:]
                assert [s.query["resourceVersion"] for s in retries] == [last] * 3
    run(scenario)


def test_a_stream_that_ends_at_once_is_backed_off_not_spun():
    async def scenario() -> None:
        async with fake_api() as api:
            # timeoutSeconds=0: the server ends every watch at once, with no event.
            backoff = Backoff(0.02, 0.2, rng=lambda: 1.0)
            async with pod_watch(api, watch_timeout_seconds=0, backoff=backoff) as w:
                await asyncio.sleep(0.4)
                watches = len(api.seen("pods", watch=True))
                # Watches at 0, 20, 60, 140, 300 ms (then 500): 5 in 0.4 s, never hundreds.
                assert 3 <= watches <= 6, watches
                assert w.stats.errors >= 2 and w.stats.lists == 1
    run(scenario)


def test_backoff_doubles_with_jitter_up_to_the_cap():
    top = Backoff(0.5, 30.0, rng=lambda: 1.0)
    assert [top.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    bottom = Backoff(0.5, 30.0, rng=lambda: 0.0)
    assert [bottom.next_delay() for _ in range(3)] == [0.25, 0.5, 1]
    top.reset()
    assert top.next_delay() == 0.5
    assert all(0.25 <= Backoff().next_delay() <= 0.5 for _ in range(100))


# --- KubernetesDiscovery -----------------------------------------------------------------

def populate(api: FakeKubeApi) -> None:
    api.put("namespaces", namespace("shop", AMBIENT))
    api.put("namespaces", namespace("plain"))
    api.put("pods", pod("web-1", "shop", ip="10.244.1.5", node="node-a", sa="web",
                        labels={"app": "web"}))
    api.put("pods", pod("web-2", "shop", ip="10.244.2.5", node="node-b", sa="web",
                        labels={"app": "web"}))
    api.put("pods", pod("tool", "plain", ip="10.244.2.9", node="node-b"))
    api.put("services", service("web", "shop", selector={"app": "web"}))
    api.put("endpointslices", endpoint_slice("web-1x", "web", "shop", endpoints=[
        slice_endpoint("10.244.1.5", "node-a"), slice_endpoint("10.244.2.5", "node-b")]))


@contextlib.asynccontextmanager
async def discovery(api_or_config: str | Configuration,
                    states: list[DiscoveredState], **kwargs: Any
                    ) -> AsyncIterator[KubernetesDiscovery]:
    kwargs.setdefault("debounce_seconds", 0.05)
    kwargs.setdefault("backoff_initial_seconds", 0.02)
    d = KubernetesDiscovery(api_or_config, "node-a", states.append, **kwargs)
    await d.start()
    try:
        assert await d.wait_synced(5)
        yield d
    finally:
        await d.stop()


def test_discovery_delivers_merged_debounced_snapshots():
    async def scenario() -> None:
        async with fake_api() as api:
            populate(api)
            states: list[DiscoveredState] = []
            # A 200 ms window: the three changes below surely land in one snapshot.
            async with discovery(api.url, states, debounce_seconds=0.2) as d:
                first = states[-1]
                assert len(states) == 1 and first.version == 1 and d.state is first
                assert sorted(first.pods) == ["plain/tool", "shop/web-1", "shop/web-2"]
                assert sorted(first.workloads) == ["shop/web-1", "shop/web-2"]
                assert first.workloads["shop/web-2"].node == "node-b"
                web = first.services["shop/web"]
                assert [(str(e.address), e.port, e.node) for e in web.endpoints] == [
                    ("10.244.1.5", 8080, "node-a"), ("10.244.2.5", 8080, "node-b")]
                for kind in ("pods", "services", "endpointslices", "namespaces"):
                    await watching(api, resource=kind)
                # Three changes in quick succession: one snapshot carries them all.
                api.put("namespaces", namespace("plain", AMBIENT))
                api.put("pods", pod("web-3", "shop", ip="10.244.1.6", labels={"app": "web"}))
                api.put("endpointslices", endpoint_slice("web-1x", "web", "shop", endpoints=[
                    slice_endpoint("10.244.1.5", "node-a"),
                    slice_endpoint("10.244.2.5", "node-b", ready=False),
                    slice_endpoint("10.244.1.6", "node-a")]))
                await eventually(lambda: len(states) == 2, "second snapshot")
                await asyncio.sleep(0.3)
                assert len(states) == 2
                second = states[1]
                assert second.version == 2
                assert sorted(second.workloads) == ["plain/tool", "shop/web-1", "shop/web-2",
                                                    "shop/web-3"]
                assert [str(e.address) for e in second.services["shop/web"].endpoints] == [
                    "10.244.1.5", "10.244.1.6"]
                assert first.services["shop/web"] is not second.services["shop/web"]
                stats = d.stats()
                assert stats["pods"]["objects"] == 4 and stats["pods"]["errors"] == 0
                api.delete("services", "shop/web")
                await eventually(lambda: "shop/web" not in states[-1].services,
                                 "service deleted")
            count = len(states)
            api.put("pods", pod("late", "shop", ip="10.244.1.7"))
            await asyncio.sleep(0.1)
            assert len(states) == count  # nothing after stop()
    run(scenario)


def test_node_scope_watches_only_this_nodes_pods():
    async def scenario() -> None:
        async with fake_api() as api:
            populate(api)
            states: list[DiscoveredState] = []
            async with discovery(api.url, states, pods="node"):
                assert sorted(states[-1].pods) == ["shop/web-1"]
                # Remote endpoints still come from the EndpointSlices, as plain endpoints.
                assert len(states[-1].services["shop/web"].endpoints) == 2
                await watching(api)
                api.put("pods", pod("web-9", "shop", ip="10.244.2.8", node="node-b"))
                api.put("pods", pod("web-8", "shop", ip="10.244.1.8", node="node-a"))
                await eventually(lambda: "shop/web-8" in states[-1].pods, "local pod")
                assert "shop/web-9" not in states[-1].pods
            assert all(s.query.get("fieldSelector") == "spec.nodeName=node-a"
                       for s in api.seen("pods"))
    run(scenario)


def test_on_change_that_raises_does_not_stop_discovery():
    async def scenario() -> None:
        async with fake_api() as api:
            populate(api)
            calls: list[int] = []

            def broken(state: DiscoveredState) -> None:
                calls.append(state.version)
                raise RuntimeError("the daemon had a bad day")
            d = KubernetesDiscovery(api.url, "node-a", broken, debounce_seconds=0.02)
            await d.start()
            try:
                assert await d.wait_synced(5)
                await watching(api)
                api.put("pods", pod("x", "shop", ip="10.244.1.9"))
                await eventually(lambda: calls == [1, 2], "second call")
            finally:
                await d.stop()
    run(scenario)


def test_wait_synced_times_out_while_the_api_is_down():
    async def scenario() -> None:
        async with fake_api() as api:
            api.fail_next(1000, 503)
            d = KubernetesDiscovery(api.url, "node-a", lambda s: None,
                                    backoff_initial_seconds=0.01, backoff_cap_seconds=0.05)
            await d.start()
            try:
                assert not await d.wait_synced(0.3)
                assert d.state is None and d.stats()["pods"]["errors"] >= 2
            finally:
                await d.stop()
    run(scenario)


# --- in-cluster configuration: token and CA over TLS -------------------------------------

def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_in_cluster_configuration_uses_the_token_and_ca(tmp_path: Path):
    cert_path, key_path = self_signed(tmp_path)
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text("s3cret")
    (sa_dir / "ca.crt").write_bytes(cert_path.read_bytes())
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert_path, key_path)

    async def scenario() -> None:
        async with fake_api(ssl_context=server_ssl, require_token="s3cret") as api:
            populate(api)
            port = api.url.rsplit(":", 1)[1]
            environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
            states: list[DiscoveredState] = []
            d = KubernetesDiscovery.in_cluster("node-a", states.append, sa_dir=str(sa_dir),
                                               environ=environ, debounce_seconds=0.02)
            assert d.configuration.host == f"https://127.0.0.1:{port}"
            await d.start()
            try:
                assert await d.wait_synced(5)
                assert "shop/web-1" in states[-1].workloads
            finally:
                await d.stop()
            assert api.requests and all(s.authorization == "Bearer s3cret"
                                        for s in api.requests)
    run(scenario)


def test_in_cluster_without_a_pod_environment_is_unavailable(tmp_path: Path):
    with pytest.raises(DiscoveryUnavailable, match="host/port"):
        KubernetesDiscovery.in_cluster("node-a", lambda s: None, sa_dir=str(tmp_path),
                                       environ={})
    with pytest.raises(DiscoveryUnavailable, match="token"):
        KubernetesDiscovery.in_cluster(
            "node-a", lambda s: None, sa_dir=str(tmp_path),
            environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1"})

