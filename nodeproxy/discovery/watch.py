"""A resumable list/watch loop for one Kubernetes resource kind (client-go's reflector, small).

The protocol is the API's documented one, spoken through a ``kubernetes_asyncio`` list
method (``CoreV1Api.list_pod_for_all_namespaces`` and the like) called with
``_preload_content=False``, so this module reads the raw stream itself:

- LIST, paged with ``limit``/``continue``: the items and ``metadata.resourceVersion``; the
  cache is replaced whole.
- WATCH from that resourceVersion (``watch``, ``resourceVersion``,
  ``allowWatchBookmarks``, ``timeoutSeconds``): newline-delimited JSON events
  ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``.  ADDED/MODIFIED/
  DELETED change the cache and advance the resourceVersion; BOOKMARK only advances it.
- The stream ending (the server may close it at any time; it does at timeoutSeconds)
  resumes the watch from the last resourceVersion seen, at once.
- 410 Gone ("too old resource version"), as an ERROR event or as the HTTP status: LIST
  again and replace the cache.
- Any other failure (connection refused, HTTP 5xx, a non-410 ERROR event, a stream cut
  mid-line): log, wait with exponential backoff and jitter (0.5 s doubling to a 30 s cap,
  each delay drawn from its upper half), retry; the backoff resets once a watch delivers.
  A stream that ends at once with no event counts as a failure, so a server that keeps
  closing cannot make the loop spin.
- A line that is not a well-formed event (bad JSON, unknown type, no name or
  resourceVersion) is logged, counted in ``stats.bad_events`` and skipped; the loop goes on.

``tests/integration/test_discovery_watch.py`` covers each of these against
``tests/integration/fake_kube_api.py``, a local aiohttp server speaking the protocol
above; no real API server runs in the tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp

from nodeproxy.discovery.convert import object_key, trim

log = logging.getLogger(__name__)

T = TypeVar("T")
# A kubernetes_asyncio list method: called with _preload_content=False it returns the
# aiohttp response unread.
ListCall = Callable[..., Awaitable[Any]]
Transform = Callable[[Mapping[str, Any]], T | None]

EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


class Gone(Exception):
    """410: the resourceVersion is too old (compacted); the cache must be listed again."""


class ApiError(Exception):
    """The API answered with an error status (HTTP or an ERROR event)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class Backoff:
    """Exponential backoff with jitter: initial, doubling, capped; each delay in [d/2, d]."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, factor: float = 2.0,
                 rng: Callable[[], float] = random.random):
        self.initial, self.cap, self.factor = initial, cap, factor
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** self.failures)
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._rng())

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatchStats:
    """Counters of one resource's loop (for logs, tests and the admin view)."""

    lists: int = 0  # complete LISTs (the first one and every relist)
    relists: int = 0  # LISTs forced by 410 Gone
    watches: int = 0  # WATCH requests made
    resumes: int = 0  # watches resumed from the last resourceVersion after a stream ended
    events: int = 0  # ADDED/MODIFIED/DELETED applied
    bookmarks: int = 0
    bad_events: int = 0  # lines that were not a well-formed event, skipped
    invalid_objects: int = 0  # objects the transform refused (left out of the cache)
    errors: int = 0  # failures followed by a backoff
    last_error: str | None = None
    last_delay: float = 0.0


async def _read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The body of a non-streaming answer; Gone for 410, ApiError for other errors."""
    async with response:
        body = await response.read()
        _check_status(response.status, body)
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ApiError(response.status, "the answer is not a JSON object")
    return data


def _check_status(status: int, body: bytes) -> None:
    if 200 <= status < 300:
        return
    message = body[:200].decode(errors="replace")
    try:
        message = json.loads(body).get("message") or message
    except (ValueError, AttributeError):
        pass
    if status == 410:
        raise Gone(message)
    raise ApiError(status, message)


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) and rv else None


class ResourceWatch(Generic[T]):
    """List, then watch, one resource kind forever, keeping ``items`` up to date.

    ``items`` maps ``namespace/name`` (``name`` for cluster-scoped kinds) to
    ``transform(object)``; a transform that returns None (or raises) leaves the object
    out.  ``on_change`` is called after every change to ``items``.
    """

    def __init__(self, kind: str, list_call: ListCall, *,
                 transform: Transform[T] | None = None,
                 on_change: Callable[[], None] | None = None,
                 backoff: Backoff | None = None, page_size: int = 500,
                 watch_timeout_seconds: int = 300, min_stream_seconds: float = 1.0,
                 request_timeout_seconds: float = 30.0):
        self.kind = kind
        self._call = list_call
        self._transform: Transform[Any] = transform or trim
        self._on_change = on_change or (lambda: None)
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.watch_timeout_seconds = watch_timeout_seconds
        self.min_stream_seconds = min_stream_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.items: dict[str, T] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.stats = WatchStats()
        self._progress = False
        self._watch_started = 0.0

    # -- the loop --------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled; never returns and never raises anything else."""
        while True:
            delay = 0.0
            listed = False
            try:
                if self.resource_version is None:
                    await self._list()
                    listed = True
                await self._watch()
                if self._progress:
                    self.stats.resumes += 1
                    log.debug("%s: watch ended at %s; resuming", self.kind,
                              self.resource_version)
                else:
                    delay = self._failed("the watch ended at once without an event")
            except Gone as e:
                self.resource_version = None
                self.stats.relists += 1
                log.info("%s: resourceVersion too old (%s); listing again", self.kind, e)
                if listed and not self._watch_made_progress():
                    delay = self._failed(f"410 right after a list: {e}")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop must survive anything the network does
                delay = self._failed(f"{type(e).__name__}: {e}")
            if delay:
                await asyncio.sleep(delay)

    def _watch_made_progress(self) -> bool:
        """The last watch delivered an event or stayed open min_stream_seconds."""
        if not self._progress and \
                time.monotonic() - self._watch_started >= self.min_stream_seconds:
            self._made_progress()
        return self._progress

    def _failed(self, reason: str) -> float:
        delay = self.backoff.next_delay()
        self.stats.errors += 1
        self.stats.last_error = reason
        self.stats.last_delay = delay
        log.warning("%s: %s; retrying in %.2fs", self.kind, reason, delay)
        return delay

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("%s: change callback failed", self.kind)

    # -- LIST ------------------------------------------------------------

    async def _list(self) -> None:
        items: dict[str, T] = {}
        rv: str | None = None
        cont: str | None = None
        while True:
            response = await self._call(
                limit=self.page_size, _continue=cont, _preload_content=False,
                _request_timeout=self.request_timeout_seconds)
            try:
                page = await _read_json(response)
            except Gone as e:  # the continue token expired: a failure, start over
                raise ApiError(410, f"list page expired: {e}") from e
            meta = page.get("metadata") or {}
            for obj in page.get("items") or []:
                key = object_key(obj) if isinstance(obj, Mapping) else None
                if key is None:
                    self.stats.invalid_objects += 1
                    continue
                value = self._convert(key, obj)
                if value is not None:
                    items[key] = value
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue") or None
            if cont is None:
                break
        if not rv:
            raise ApiError(None, "the list has no metadata.resourceVersion")
        self.items = items
        self.resource_version = rv
        self.stats.lists += 1
        log.info("%s: listed %d at resourceVersion %s", self.kind, len(items), rv)
        self.synced.set()
        self._changed()

    def _convert(self, key: str, obj: Mapping[str, Any]) -> T | None:
        try:
            value: T | None = self._transform(obj)
            return value
        except Exception as e:
            self.stats.invalid_objects += 1
            log.warning("%s %s left out: %s", self.kind, key, e)
            return None

    # -- WATCH -----------------------------------------------------------

    async def _watch(self) -> None:
        self._progress = False
        self.stats.watches += 1
        self._watch_started = time.monotonic()
        response = await self._call(
            watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_seconds, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=self.request_timeout_seconds,
                sock_read=self.watch_timeout_seconds + self.request_timeout_seconds))
        async with response:
            if not 200 <= response.status < 300:
                _check_status(response.status, await response.read())
            while True:
                line = await response.content.readline()
                if not line:
                    break
                if line.strip():
                    self._handle(line)
        self._watch_made_progress()

    def _bad(self, line: bytes, why: str) -> None:
        self.stats.bad_events += 1
        log.warning("%s: skipped a watch event (%s): %.200r", self.kind, why, line)

    def _handle(self, line: bytes) -> None:
        """Apply one event line; raises Gone/ApiError for ERROR events."""
        try:
            event = json.loads(line)
        except ValueError:
            return self._bad(line, "not JSON")
        if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES \
                or not isinstance(event.get("object"), Mapping):
            return self._bad(line, "not an event")
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            code, message = obj.get("code"), str(obj.get("message") or obj.get("reason"))
            if code == 410:
                raise Gone(message)
            raise ApiError(code if isinstance(code, int) else None, f"ERROR event: {message}")
        rv = _resource_version(obj)
        if rv is None:
            return self._bad(line, "no metadata.resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = rv
            self.stats.bookmarks += 1
            self._made_progress()
            return None
        key = object_key(obj)
        if key is None:
            return self._bad(line, "no metadata.name")
        value = None if kind == "DELETED" else self._convert(key, obj)
        if value is None:
            self.items.pop(key, None)
        else:
            self.items[key] = value
        self.resource_version = rv
        self.stats.events += 1
        self._made_progress()
        self._changed()
        return None

    def _made_progress(self) -> None:
        if not self._progress:
            self._progress = True
            self.backoff.reset()
