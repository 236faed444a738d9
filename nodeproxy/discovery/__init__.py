"""Kubernetes API discovery: pods, services, endpointslices and namespaces, merged into the
node's state.

- ``watch``: a resumable list/watch loop for one resource kind (relist on 410, resume from
  the last resourceVersion and from BOOKMARKs, exponential backoff with jitter, bad
  events counted and skipped).
- ``convert``: pure functions from the API's objects to the node model (``Workload``,
  ``Service`` with EndpointSlice endpoints, namespace labels).
- ``state``: ``DiscoveredState``, the immutable merged snapshot, the opt-in/opt-out rule
  (``istio.io/dataplane-mode`` / ``nodeproxy.io/dataplane-mode``) and the precedence of
  the node YAML over what is discovered.
- ``kubernetes``: ``KubernetesDiscovery``, which runs the four loops with ``kubernetes_asyncio``
  and delivers debounced snapshots to a callback.

What the tests cover: no API server can run where nodeproxy is built and tested, so
``tests/integration/test_discovery_watch.py`` runs the real client against
``tests/integration/fake_kube_api.py``, a local aiohttp server on 127.0.0.1 that speaks the
API's documented list/watch protocol (a List with ``metadata.resourceVersion``, paged with
``limit``/``continue``; a chunked stream of newline-delimited ``ADDED``/``MODIFIED``/
``DELETED``/``BOOKMARK``/``ERROR`` events from a resourceVersion; 410 Gone once that
version is compacted; the stream closed at any time; ``fieldSelector=spec.nodeName``;
bearer-token auth over TLS for the in-cluster path).  Behaviour of a real API server
beyond that protocol (watch caches, priority and fairness, protobuf, WatchList streaming)
is not exercised.  See docs/discovery.md.
"""

from typing import Any

from nodeproxy.discovery.state import DiscoveredState, is_meshed

__all__ = ["DiscoveredState", "DiscoveryUnavailable", "KubernetesDiscovery", "is_meshed"]


def __getattr__(name: str) -> Any:
    # The client pulls in kubernetes_asyncio (~60 MiB of resident memory): only a daemon
    # with discovery on should pay for it.
    if name in ("DiscoveryUnavailable", "KubernetesDiscovery"):
        from nodeproxy.discovery import kubernetes

        return getattr(kubernetes, name)
    raise AttributeError(name)
