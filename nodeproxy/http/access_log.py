"""Access log: one JSON object per line per request, written off the event loop.

``AccessLog.write`` only appends the entry to a bounded in-memory queue (a deque whose
length is checked first: about 0.1 us, where ``queue.Queue.put_nowait`` takes a lock and
raises on full, about 1 us); when the queue is full the entry is dropped and counted in
``nodeproxy_access_log_dropped_total``, so a slow disk or a stalled stdout never holds
requests back.  A daemon thread takes the entries in batches, serializes them and
appends them to the file (``path: "-"``: the daemon's stdout), flushing after each batch.
``close`` writes what was queued before it and stops the thread.

Fields, in this order (JSON keys are stable; an unknown value is ``null``):

=====================  ================================================================
start_time             when the request's first byte arrived, RFC 3339 UTC with
                       milliseconds ("2024-05-01T12:00:00.123Z")
source_principal       the client's SPIFFE ID
source_workload        the client's workload (canonical name) and namespace
source_namespace
destination_principal  the server's SPIFFE ID
destination_workload   the server's workload and namespace
destination_namespace
destination_service    the service FQDN the request was routed to
method                 the request's method, authority (Host / :authority) and path
authority              (path: origin form, query included)
path
protocol               the request's protocol ("HTTP/1.1", "HTTP/2"); on the line an
                       upgraded connection writes when it ends, the upgrade token
                       ("websocket"), with its bytes each way and its lifetime
status                 the response code sent to the client, 0 when none was
grpc_status            the gRPC status (a number, as a string), null when not gRPC
response_flags         Envoy's response flags ("UF", "UH,URX", ...), "-" when none
bytes_received         request bytes received from the client
bytes_sent             response bytes sent to the client
duration_ms            from the first request byte to the last response byte (float)
upstream_host          the endpoint of the last attempt, "ip:port" ("[ip6]:port"),
                       null when no attempt reached one
attempts               upstream attempts made (0 when none was)
trace_id               from traceparent, else x-b3-traceid, else x-request-id (see
                       ``trace_id``), null when none is present
request_id             the request's x-request-id, null when none
=====================  ================================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from nodeproxy.codec.message import Headers
    from nodeproxy.config.model import AccessLogSettings

log = logging.getLogger(__name__)

# Entries serialized and written per write() call at most.
BATCH = 512


class DropCounter(Protocol):
    """Where dropped lines are counted (a prometheus_client Counter without labels)."""

    def inc(self, amount: float = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    """One request's access-log line (see the module docstring for each field).

    ``start_time`` is Unix time in seconds (``time.time()``): the writer thread formats it,
    not the event loop.
    """

    start_time: float
    source_principal: str | None
    source_workload: str | None
    source_namespace: str | None
    destination_principal: str | None
    destination_workload: str | None
    destination_namespace: str | None
    destination_service: str | None
    method: str
    authority: str
    path: str
    protocol: str
    status: int
    grpc_status: str | None
    response_flags: str
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    upstream_host: str | None
    attempts: int
    trace_id: str | None
    request_id: str | None


FIELDS = tuple(AccessLogEntry.__dataclass_fields__)


def rfc3339_ms(t: float) -> str:
    """Unix time as RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def to_json(entry: AccessLogEntry) -> str:
    """The entry's JSON line (without the newline)."""
    record = {name: getattr(entry, name) for name in FIELDS}
    record["start_time"] = rfc3339_ms(entry.start_time)
    record["duration_ms"] = round(entry.duration_ms, 3)
    return json.dumps(record, separators=(",", ":"))


def _hex(value: str, lengths: tuple[int, ...]) -> bool:
    return len(value) in lengths and all(c in "0123456789abcdef" for c in value.lower())


def trace_id(headers: Headers) -> str | None:
    """The trace a request belongs to: W3C traceparent's trace-id, else B3's
    x-b3-traceid, else x-request-id (Envoy's correlation id); None when none is valid."""
    traceparent = b3 = request_id = None
    for name, value in headers:
        if name == "traceparent":
            traceparent = traceparent or value
        elif name == "x-b3-traceid":
            b3 = b3 or value
        elif name == "x-request-id":
            request_id = request_id or value
    if traceparent is not None:
        # version "-" trace-id (32 hex, not all zero) "-" parent-id "-" flags
        parts = traceparent.strip().split("-")
        if (len(parts) >= 4 and _hex(parts[0], (2,)) and parts[0].lower() != "ff"
                and _hex(parts[1], (32,)) and parts[1].strip("0")):
            return parts[1].lower()
    if b3 is not None:
        b3 = b3.strip()
        if _hex(b3, (16, 32)) and b3.strip("0"):
            return b3.lower()
    if request_id:
        return request_id.strip() or None
    return None


class AccessLog:
    """The access log of one daemon: ``write`` from the event loop, lines from a thread."""

    def __init__(self, settings: AccessLogSettings, dropped_counter: DropCounter, *,
                 stream: TextIO | None = None):
        """``stream`` replaces the settings' path (tests, embedding); it is not closed."""
        self._max = settings.queue_size
        self._dropped = dropped_counter
        self._pending: deque[AccessLogEntry] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._own_stream = False
        if stream is not None:
            self._stream = stream
        elif settings.path == "-":
            self._stream = sys.stdout
        else:
            # Opened here so a bad path fails at startup, not in the thread.  Appending;
            # line buffering (each batch is one write, so one flush).
            self._stream = open(settings.path, "a", buffering=1, encoding="utf-8")
            self._own_stream = True
        self._writer = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._writer.start()

    def write(self, entry: AccessLogEntry) -> None:
        """Queue one line; never blocks.  A full queue (or a closed log) drops and counts."""
        pending = self._pending
        if len(pending) >= self._max or self._closing:
            self._dropped.inc()
            return
        pending.append(entry)
        # Appended before the check: a writer that cleared the flag drains after clearing,
        # so it sees this entry; one that has not cleared it yet will.
        if not self._wake.is_set():
            self._wake.set()

    @property
    def pending(self) -> int:
        """Entries queued and not yet written."""
        return len(self._pending)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write every entry queued so far, stop the thread and close the file.

        Blocks up to ``timeout`` seconds (the writer may be stuck on a full disk or a
        blocked pipe: it is a daemon thread and is then left behind); from a coroutine use
        ``aclose``.
        """
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("access log: the writer did not finish within %ss; %d lines unwritten",
                        timeout, len(self._pending))
            return
        if self._own_stream:
            self._stream.close()

    async def aclose(self, timeout: float | None = 10.0) -> None:
        """``close`` without blocking the event loop."""
        await asyncio.to_thread(self.close, timeout)

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        pending = self._pending
        while True:
            self._wake.wait()
            self._wake.clear()
            while pending:
                batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
                self._write_batch(batch)
            if self._closing and not pending:
                return

    def _write_batch(self, batch: list[AccessLogEntry]) -> None:
        try:
            text = "\n".join(to_json(e) for e in batch) + "\n"
            self._stream.write(text)
            self._stream.flush()
        except Exception:  # the thread must outlive a full disk or a closed pipe
            log.exception("access log: could not write %d lines", len(batch))
            self._dropped.inc(len(batch))
