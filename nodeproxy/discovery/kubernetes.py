"""``KubernetesDiscovery``: list/watch pods, services, endpointslices and namespaces.

Four ``ResourceWatch`` loops (``nodeproxy.discovery.watch``) over ``kubernetes_asyncio``'s
generated API methods feed caches; every change schedules one new ``DiscoveredState``
(``nodeproxy.discovery.state``), delivered to ``on_change``.

What is watched:

- pods, cluster-wide by default (``pods="cluster"``).  A destination on another node is
  reached over HBONE and authenticated by its service account, and whether it is meshed at
  all depends on its labels; EndpointSlices carry neither, so remote pods are watched too.
  With ``pods="node"`` only this node's pods are watched (``fieldSelector=
  spec.nodeName=<node>``), for clusters where a cluster-wide pod cache is too much: remote
  service endpoints then come from EndpointSlices alone, are no workloads, and the proxy
  dials them directly (no HBONE, no remote identity).
- services, endpointslices (``discovery.k8s.io/v1``) and namespaces, cluster-wide.

RBAC it needs: get/list/watch on pods, services and namespaces (core) and on
endpointslices (discovery.k8s.io).

``on_change`` runs in the event loop with the new snapshot.  It is debounced: the first
change starts a timer (``debounce_seconds``, 100 ms) and everything that arrives meanwhile
goes out in the same snapshot.  The first call comes once all four kinds are listed;
later ones follow every change (a relist included).  An exception it raises is logged.

Construction: ``KubernetesDiscovery("http://127.0.0.1:8001", node, cb)`` talks to a base
URL without authentication (tests, ``kubectl proxy``); a ``kubernetes_asyncio``
``Configuration`` is used as given; ``KubernetesDiscovery.in_cluster(node, cb)`` reads the
pod's service-account token and CA and ``KUBERNETES_SERVICE_HOST``/``PORT`` (the token is
re-read as the kubelet rotates it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Literal

from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, DiscoveryV1Api
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from nodeproxy.config.model import Service, Workload
from nodeproxy.discovery.convert import (
    SERVICE_NAME_LABEL,
    ConversionError,
    namespace_labels,
    pod_to_workload,
    service_to_service,
    trim,
)
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.discovery.watch import Backoff, ListCall, ResourceWatch

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PodScope = Literal["cluster", "node"]
KINDS = ("pods", "services", "endpointslices", "namespaces")


class DiscoveryUnavailable(RuntimeError):
    """In-cluster configuration is missing (not running in a pod, no token or CA)."""


def in_cluster_configuration(sa_dir: str = SERVICE_ACCOUNT_DIR,
                             environ: Mapping[str, str] | None = None) -> Configuration:
    """The API server's address, the service-account token and the cluster CA, as a pod has."""
    configuration = Configuration()
    loader = InClusterConfigLoader(
        token_filename=os.path.join(sa_dir, "token"),
        cert_filename=os.path.join(sa_dir, "ca.crt"),
        environ=dict(os.environ if environ is None else environ))
    try:
        loader.load_and_set(configuration)
    except (ConfigException, OSError) as e:
        raise DiscoveryUnavailable(f"no in-cluster Kubernetes configuration: {e}") from e
    return configuration


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


class KubernetesDiscovery:
    """Watches the API and delivers merged ``DiscoveredState`` snapshots (module docstring)."""

    def __init__(self, api: str | Configuration, node_name: str,
                 on_change: Callable[[DiscoveredState], None], *,
                 pods: PodScope = "cluster", debounce_seconds: float = 0.1,
                 backoff_initial_seconds: float = 0.5, backoff_cap_seconds: float = 30.0,
                 watch_timeout_seconds: int = 300, page_size: int = 500):
        if isinstance(api, str):
            self.configuration = Configuration(host=api.rstrip("/"))
        else:
            self.configuration = api
        self.node_name = node_name
        self.on_change = on_change
        self.pod_scope: PodScope = pods
        self.debounce_seconds = debounce_seconds
        self._backoff = (backoff_initial_seconds, backoff_cap_seconds)
        self._watch_timeout = watch_timeout_seconds
        self._page_size = page_size
        self.state: DiscoveredState | None = None
        self.watches: dict[str, ResourceWatch[Any]] = {}
        self._client: ApiClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flush: asyncio.Task[None] | None = None
        self._published = asyncio.Event()
        self._version = 0
        self._service_memo: dict[str, tuple[tuple[str, ...], Service | None]] = {}

    @classmethod
    def in_cluster(cls, node_name: str, on_change: Callable[[DiscoveredState], None], *,
                   sa_dir: str = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] | None = None,
                   **options: Any) -> KubernetesDiscovery:
        """Raises DiscoveryUnavailable outside a pod."""
        return cls(in_cluster_configuration(sa_dir, environ), node_name, on_change, **options)

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Start the four watch loops and return; the first snapshot follows the first lists."""
        if self._tasks:
            return
        self._client = ApiClient(self.configuration)
        core, discovery = CoreV1Api(self._client), DiscoveryV1Api(self._client)
        list_pods: ListCall = core.list_pod_for_all_namespaces
        if self.pod_scope == "node":
            list_pods = functools.partial(list_pods, field_selector=f"spec.nodeName="
                                                                    f"{self.node_name}")
        calls: dict[str, tuple[ListCall, Callable[[Mapping[str, Any]], Any]]] = {
            "pods": (list_pods, pod_to_workload),
            "services": (core.list_service_for_all_namespaces, trim),
            "endpointslices": (discovery.list_endpoint_slice_for_all_namespaces, trim),
            "namespaces": (core.list_namespace, namespace_labels),
        }
        for kind, (call, transform) in calls.items():
            self.watches[kind] = ResourceWatch(
                kind, call, transform=transform, on_change=self._changed,
                backoff=Backoff(*self._backoff), page_size=self._page_size,
                watch_timeout_seconds=self._watch_timeout)
        self._tasks = [asyncio.create_task(w.run(), name=f"discovery-{kind}")
                       for kind, w in self.watches.items()]
        log.info("discovery: watching %s at %s (pods: %s)", ", ".join(KINDS),
                 self.configuration.host, self.pod_scope)

    async def stop(self) -> None:
        """Stop every loop and close the HTTP session; no on_change call after this."""
        tasks = self._tasks + ([self._flush] if self._flush else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._flush = [], None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first snapshot; False if it did not come within timeout."""
        try:
            await asyncio.wait_for(self._published.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per kind: the loop's counters, its resourceVersion and cache size."""
        return {kind: {**asdict(w.stats), "resourceVersion": w.resource_version,
                       "objects": len(w.items), "synced": w.synced.is_set()}
                for kind, w in self.watches.items()}

    # -- snapshots -------------------------------------------------------

    def _changed(self) -> None:
        if self._flush is not None or not self.watches:
            return
        if not all(w.synced.is_set() for w in self.watches.values()):
            return
        self._flush = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self.debounce_seconds)
        finally:
            self._flush = None
        self._publish()

    def _publish(self) -> None:
        self._version += 1
        pods: list[Workload] = list(self.watches["pods"].items.values())
        state = DiscoveredState.build(self._version, pods, self._services(),
                                      self.watches["namespaces"].items)
        self.state = state
        self._published.set()
        try:
            self.on_change(state)
        except Exception:
            log.exception("discovery: on_change failed for snapshot %d", state.version)

    def _services(self) -> list[Service]:
        """Services with their slices, converted again only when one of them changed."""
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for s in self.watches["endpointslices"].items.values():
            meta = s.get("metadata") or {}
            owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if owner:
                by_service.setdefault(f"{meta.get('namespace', 'default')}/{owner}", []
                                      ).append(s)
        memo: dict[str, tuple[tuple[str, ...], Service | None]] = {}
        for key, svc in self.watches["services"].items.items():
            slices = by_service.get(key, [])
            fingerprint = (_rv(svc), *sorted(_rv(s) for s in slices))
            cached = self._service_memo.get(key)
            if cached is not None and cached[0] == fingerprint:
                memo[key] = cached
                continue
            try:
                converted = service_to_service(svc, slices)
            except ConversionError as e:
                log.warning("discovery: service %s left out: %s", key, e)
                converted = None
            memo[key] = (fingerprint, converted)
        self._service_memo = memo
        return [s for _, s in memo.values() if s is not None]
