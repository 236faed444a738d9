"""A small in-process Kubernetes API server speaking the documented list/watch protocol.

Enough of it for nodeproxy.discovery's tests, no more:

- ``GET /api/v1/{pods,services,namespaces}`` and
  ``GET /apis/discovery.k8s.io/v1/endpointslices`` list (a ``<Kind>List`` with
  ``metadata.resourceVersion``, paged with ``limit``/``continue``) and filter by
  ``fieldSelector`` (``a.b=value`` terms, comma-separated).
- With ``watch=1|true``: a chunked stream of newline-delimited JSON events
  ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`` from
  ``resourceVersion`` (every change after it, then live ones); an object that starts or
  stops matching the field selector arrives as ADDED or DELETED, as the API sends it.
  A resourceVersion older than the last ``compact()`` gets an ERROR event with a 410
  Status ("too old resource version") and the stream ends.  ``timeoutSeconds`` ends the
  stream; so does ``close_watches()``, at any time.  Bookmarks are sent on request.
- ``GET /api/v1/namespaces/<ns>/pods/<name>``: one pod (404 Status when absent).
- ``POST /apis/authentication.k8s.io/v1/tokenreviews``: a TokenReview of a token the test
  issued with ``issue_token`` (a projected ServiceAccount token: its audiences and the pod
  it is bound to).  As the API server does, a token none of whose audiences is among
  ``spec.audiences`` is not authenticated (status.error names the audiences), an unknown
  one neither, and an authenticated one carries ``authentication.kubernetes.io/pod-name``
  and ``pod-uid`` in ``user.extra`` and the audiences it matched.
- ``ApiThread`` runs one on its own event loop thread, for tests whose other side is a
  process or a blocking client (on loopback, or on a socket the test opened in a netns).
- Test controls: ``fail_next(n, status)`` answers the next n requests with that status,
  ``send_raw`` writes any line to open watches, ``requests`` records every query, and
  ``require_token`` checks a bearer token.  Serves HTTPS when given an SSL context.

One resourceVersion counter is shared by all kinds, as etcd's is.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATHS = {
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "namespaces": "/api/v1/namespaces",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
}
LIST_KINDS = {
    "pods": ("PodList", "v1"),
    "services": ("ServiceList", "v1"),
    "namespaces": ("NamespaceList", "v1"),
    "endpointslices": ("EndpointSliceList", "discovery.k8s.io/v1"),
}
NAMESPACED = {"pods", "services", "endpointslices"}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def key_of(resource: str, obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    if resource in NAMESPACED:
        return f"{meta.get('namespace', 'default')}/{meta['name']}"
    return str(meta["name"])


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def matches(selector: str | None, obj: dict[str, Any] | None) -> bool:
    if obj is None:
        return False
    for term in filter(None, (selector or "").split(",")):
        path, _, want = term.partition("=")
        if _field(obj, path) != want:
            return False
    return True


@dataclass
class Change:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass
class Seen:
    """One request as the server saw it."""

    resource: str
    query: dict[str, str]
    authorization: str | None

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("1", "true", "True")


@dataclass(eq=False)
class _Watcher:
    resource: str
    selector: str | None
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


class FakeKubeApi:
    def __init__(self, ssl_context: ssl.SSLContext | None = None,
                 require_token: str | None = None):
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in PATHS}
        self.history: list[Change] = []
        self.compacted = 0  # watches from a resourceVersion below this get 410
        self.requests: list[Seen] = []
        self._failures: list[int] = []
        self._watchers: set[_Watcher] = set()
        self._ssl = ssl_context
        self._token = require_token
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.tokens: dict[str, dict[str, Any]] = {}  # issue_token
        self.reviews: list[dict[str, Any]] = []  # every TokenReview spec received

    # -- server ----------------------------------------------------------

    async def start(self, sock: Any = None) -> str:
        """Serve on 127.0.0.1 (an ephemeral port), or on a listening socket given (one
        made inside a network namespace, for a daemon that lives there)."""
        app = web.Application()
        for resource, path in PATHS.items():
            app.router.add_get(path, self._handler(resource))
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self._get_pod)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews",
                            self._token_review)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock, ssl_context=self._ssl)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the objects (each change bumps the shared resourceVersion) ----------

    def _change(self, resource: str, type_: str, obj: dict[str, Any],
                notify: bool = True) -> dict[str, Any]:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        key = key_of(resource, obj)
        old = self.objects[resource].get(key)
        if type_ == "DELETED":
            self.objects[resource].pop(key, None)
        else:
            self.objects[resource][key] = obj
        change = Change(self.rv, resource, type_, obj, old)
        self.history.append(change)
        if notify:
            for w in list(self._watchers):
                if w.resource == resource:
                    self._send_change(w, change)
        return obj

    def put(self, resource: str, obj: dict[str, Any], notify: bool = True) -> dict[str, Any]:
        """Create or replace (ADDED or MODIFIED)."""
        exists = key_of(resource, obj) in self.objects[resource]
        return self._change(resource, "MODIFIED" if exists else "ADDED", obj, notify)

    def delete(self, resource: str, key: str, notify: bool = True) -> None:
        self._change(resource, "DELETED", self.objects[resource][key], notify)

    def compact(self) -> None:
        """Forget history: a watch from any resourceVersion older than now gets 410."""
        self.compacted = self.rv
        self.history.clear()

    # -- test controls ---------------------------------------------------

    def issue_token(self, token: str, *, namespace: str, service_account: str,
                    pod_name: str | None, pod_uid: str | None,
                    audiences: list[str]) -> str:
        """Make `token` a projected ServiceAccount token of namespace/service_account,
        bound to a pod (None: a legacy token bound to nothing), for `audiences`."""
        self.tokens[token] = {"namespace": namespace, "service_account": service_account,
                              "pod_name": pod_name, "pod_uid": pod_uid,
                              "audiences": list(audiences)}
        return token

    async def _get_pod(self, request: web.Request) -> web.Response:
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        self.requests.append(Seen("pods", {"get": key}, request.headers.get("Authorization")))
        if self._failures:
            code = self._failures.pop(0)
            return web.json_response(status(code, "InternalError", "injected failure"),
                                     status=code)
        obj = self.objects["pods"].get(key)
        if obj is None:
            return web.json_response(status(404, "NotFound", f'pods "{key}" not found'),
                                     status=404)
        return web.json_response(obj)

    async def _token_review(self, request: web.Request) -> web.Response:
        if self._failures:
            code = self._failures.pop(0)
            return web.json_response(status(code, "InternalError", "injected failure"),
                                     status=code)
        review = await request.json()
        spec = review.get("spec") or {}
        self.reviews.append(spec)
        token = self.tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        answer: dict[str, Any] = {"authenticated": False}
        if token is None:
            answer["error"] = "invalid bearer token"
        elif wanted and not set(wanted) & set(token["audiences"]):
            answer["error"] = (f"invalid bearer token, token audiences {token['audiences']} "
                               f"is invalid for the target audiences {wanted}")
        else:
            extra: dict[str, list[str]] = {}
            if token["pod_name"] is not None:
                extra["authentication.kubernetes.io/pod-name"] = [token["pod_name"]]
                extra["authentication.kubernetes.io/pod-uid"] = [token["pod_uid"]]
            ns, sa = token["namespace"], token["service_account"]
            answer = {"authenticated": True,
                      "user": {"username": f"system:serviceaccount:{ns}:{sa}",
                               "uid": f"uid-sa-{ns}-{sa}",
                               "groups": ["system:serviceaccounts",
                                          f"system:serviceaccounts:{ns}",
                                          "system:authenticated"],
                               "extra": extra},
                      "audiences": [a for a in wanted if a in token["audiences"]]
                      if wanted else token["audiences"]}
        return web.json_response({"kind": "TokenReview",
                                  "apiVersion": "authentication.k8s.io/v1",
                                  "spec": spec, "status": answer}, status=201)

    def fail_next(self, count: int, code: int = 500) -> None:
        self._failures.extend([code] * count)

    def close_watches(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(None)

    def send_raw(self, resource: str, line: bytes) -> None:
        for w in list(self._watchers):
            if w.resource == resource:
                w.queue.put_nowait(line)

    def bookmark(self, resource: str) -> None:
        kind = LIST_KINDS[resource][0].removesuffix("List")
        self.send_raw(resource, _line({"type": "BOOKMARK", "object": {
            "kind": kind, "metadata": {"resourceVersion": str(self.rv)}}}))

    def expire_watches(self, resource: str) -> None:
        """An ERROR 410 on open watches, as the API sends when it cannot keep up."""
        self.send_raw(resource, _line({"type": "ERROR", "object": status(
            410, "Expired", "too old resource version")}))

    def watching(self, resource: str) -> int:
        return sum(1 for w in self._watchers if w.resource == resource)

    def seen(self, resource: str, watch: bool | None = None) -> list[Seen]:
        return [s for s in self.requests
                if s.resource == resource and (watch is None or s.watch == watch)]

    # -- HTTP ------------------------------------------------------------

    def _handler(self, resource: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            query = dict(request.query)
            seen = Seen(resource, query, request.headers.get("Authorization"))
            self.requests.append(seen)
            if self._token is not None and seen.authorization != f"Bearer {self._token}":
                return web.json_response(status(401, "Unauthorized", "Unauthorized"),
                                         status=401)
            if self._failures:
                code = self._failures.pop(0)
                return web.json_response(status(code, "InternalError", "injected failure"),
                                         status=code)
            if seen.watch:
                return await self._watch(request, resource, query)
            return self._list(resource, query)
        return handle

    def _list(self, resource: str, query: dict[str, str]) -> web.Response:
        items = [o for _, o in sorted(self.objects[resource].items())
                 if matches(query.get("fieldSelector"), o)]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0)
        page = items[start:start + limit] if limit else items[start:]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if limit and start + limit < len(items):
            meta["continue"] = str(start + limit)
        kind, api_version = LIST_KINDS[resource]
        return web.json_response({"kind": kind, "apiVersion": api_version,
                                  "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, resource: str,
                     query: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watcher = _Watcher(resource, query.get("fieldSelector"))
        since = int(query.get("resourceVersion") or 0)
        if since and since < self.compacted:
            await response.write(_line({"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {since} ({self.compacted})")}))
            return response
        # Register and replay in one step (no await between): no change can slip through.
        self._watchers.add(watcher)
        if since:
            for change in self.history:
                if change.resource == resource and change.rv > since:
                    self._send_change(watcher, change)
        else:  # "any version": the current objects as ADDED, then live changes
            for obj in self.objects[resource].values():
                if matches(watcher.selector, obj):
                    watcher.queue.put_nowait(_line({"type": "ADDED", "object": obj}))
        timeout = float(query.get("timeoutSeconds") or 3600)
        try:
            async with asyncio.timeout(timeout):
                while (line := await watcher.queue.get()) is not None:
                    await response.write(line)
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self._watchers.discard(watcher)
        return response

    def _send_change(self, watcher: _Watcher, change: Change) -> None:
        now, before = (matches(watcher.selector, change.obj),
                       matches(watcher.selector, change.old))
        type_ = change.type
        if type_ == "MODIFIED" and now and not before:
            type_ = "ADDED"
        elif type_ == "MODIFIED" and before and not now:
            type_ = "DELETED"
        elif not now and not (type_ == "DELETED" and before):
            return
        watcher.queue.put_nowait(_line({"type": type_, "object": change.obj}))


class ApiThread:
    """A FakeKubeApi on its own event loop thread: listening on loopback, or on `sock`
    (e.g. one bound inside a simulated node's netns)."""

    def __init__(self, sock: Any = None) -> None:
        self.api = FakeKubeApi()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url: str = self.call(self.api.start(sock=sock))

    @classmethod
    def in_netns(cls, netns_path: str) -> ApiThread:
        """One listening on 127.0.0.1 inside that network namespace."""
        from nodeproxy_dev.testbed import netns

        sock = netns.socket_in(netns_path, socket.AF_INET)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        return cls(sock)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def do(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) on the API's loop (its state is the loop's alone)."""
        async def run() -> Any:
            return fn(*args, **kwargs)
        return self.call(run())

    def close(self) -> None:
        self.call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


# -- object builders ----------------------------------------------------------------------

def pod(name: str, namespace: str = "default", *, ip: str | None = "10.244.1.5",
        ips: list[str] | None = None, node: str = "node-a", sa: str = "default",
        labels: dict[str, str] | None = None, phase: str = "Running",
        host_network: bool = False) -> dict[str, Any]:
    all_ips = ips if ips is not None else ([ip] if ip else [])
    status_: dict[str, Any] = {"phase": phase}
    if all_ips:
        status_.update(podIP=all_ips[0], podIPs=[{"ip": i} for i in all_ips])
    spec: dict[str, Any] = {"nodeName": node, "serviceAccountName": sa,
                            "containers": [{"name": "app", "image": "app"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                         "uid": f"uid-{namespace}-{name}"},
            "spec": spec, "status": status_}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                                  **(labels or {})}},
            "status": {"phase": "Active"}}


def service(name: str, namespace: str = "default", *, vips: list[str] | None = None,
            ports: list[dict[str, Any]] | None = None,
            selector: dict[str, str] | None = None, type_: str = "ClusterIP"
            ) -> dict[str, Any]:
    vips = vips if vips is not None else ["10.96.0.10"]
    spec: dict[str, Any] = {
        "type": type_, "clusterIP": vips[0] if vips else "None", "clusterIPs": vips or ["None"],
        "ports": ports if ports is not None else [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    if selector is not None:
        spec["selector"] = selector
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def endpoint_slice(name: str, service_name: str, namespace: str = "default", *,
                   address_type: str = "IPv4",
                   ports: list[dict[str, Any]] | None = None,
                   endpoints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type,
            "ports": ports if ports is not None else [
                {"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints or []}


def slice_endpoint(address: str, node: str | None = "node-a", ready: bool | None = True,
                   pod_name: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [address], "conditions": {}}
    if ready is not None:
        ep["conditions"]["ready"] = ready
    if node:
        ep["nodeName"] = node
    if pod_name:
        ep["targetRef"] = {"kind": "Pod", "name": pod_name}
    return ep
