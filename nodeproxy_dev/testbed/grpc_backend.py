"""gRPC test backend for the L7 tests: service ``test.Echo`` on raw bytes (no protoc).

Run inside pods as ``python -m nodeproxy_dev.testbed.grpc_backend --port P --name NAME``
(``--host ::``, the default, is dual stack; ``--port 0`` picks a free port).  Once
listening it prints one JSON line, like ``peer serve``:
``{"listening": "[::]:P", "name": ..., "pid": ..., "ready": true}``.

Requests and responses are raw bytes (generic handlers, no serializers).  Every call
that succeeds sends the initial metadata ``x-backend: NAME`` (ClientStream: once the
requests are read) and the trailing metadata ``x-backend: NAME``; failing calls send
only trailers (a gRPC "trailers-only" response), which also carry ``x-backend``.  Methods
(``/test.Echo/<Method>``):

- ``Unary``: the request back.
- ``ServerStream``: request ``n[:size[:interval_ms]]`` (decimal ASCII) -> n messages;
  message i is ``i`` in decimal, or with size, ``"<i> "`` repeated to size bytes;
  interval_ms sleeps between messages.
- ``ClientStream``: the total length of the request messages, in decimal ASCII.
- ``BidiStream``: every request message back as it arrives.
- ``Fail``: request ``<code>`` (a number like ``14`` or a name like ``UNAVAILABLE``)
  aborts with that status; ``<key>:<n>:<code>`` aborts the first n calls with that key,
  later ones return ``ok``.  Trailing metadata ``x-attempt`` counts the calls of the key.
- ``Sleep``: request ``<ms>``: sleeps (until the call is cancelled), then returns it.
- ``Info``: JSON ``{name, method, metadata: [[k, v], ...], authority, peer, served}``:
  what the call looked like when it reached the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from types import FrameType

import grpc

from nodeproxy_dev.testbed.peer import emit

SERVICE = "test.Echo"
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a busy port is an error, not a second server on it
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def status_code(text: str) -> grpc.StatusCode:
    """A grpc.StatusCode from its number ("14") or its name ("UNAVAILABLE")."""
    text = text.strip()
    for code in grpc.StatusCode:
        if text.upper() == code.name or (text.isdigit() and int(text) == code.value[0]):
            return code
    raise ValueError(f"{text!r} is not a gRPC status code")


class EchoService:
    """The handlers of test.Echo and the server's counters (thread-safe)."""

    def __init__(self, name: str):
        self.name = name
        self.served = 0
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self) -> int:
        with self._lock:
            self.served += 1
            return self.served

    def _ok(self, context: grpc.ServicerContext, *extra: tuple[str, str]) -> None:
        context.send_initial_metadata((("x-backend", self.name),))
        context.set_trailing_metadata((("x-backend", self.name), *extra))

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        self._ok(context)
        return request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        fields = request.decode("ascii", "replace").split(":")
        try:
            n = int(fields[0])
            size = int(fields[1]) if len(fields) > 1 and fields[1] else 0
            interval = int(fields[2]) / 1000 if len(fields) > 2 else 0.0
        except ValueError:
            context.set_trailing_metadata((("x-backend", self.name),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"ServerStream wants n[:size[:interval_ms]], not {request[:40]!r}")
        self._ok(context)
        for i in range(n):
            if i and interval:
                time.sleep(interval)
            if not context.is_active():
                return
            text = str(i).encode()
            yield ((text + b" ") * (size // (len(text) + 1) + 1))[:size] if size else text

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count()
        total = sum(len(r) for r in requests)
        self._ok(context)
        return str(total).encode()

    def bidi_stream(self, requests: Iterator[bytes],
                    context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        self._ok(context)
        yield from requests

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        text = request.decode("ascii", "replace")
        key, n, code_text = "", 1 << 62, text
        if text.count(":") == 2:
            key, n_text, code_text = text.split(":")
            n = int(n_text) if n_text.isdigit() else 0
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        trailers = (("x-backend", self.name), ("x-attempt", str(attempt)))
        try:
            code = status_code(code_text)
        except ValueError as e:
            context.set_trailing_metadata(trailers)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if attempt <= n and code != grpc.StatusCode.OK:
            context.set_trailing_metadata(trailers)
            context.abort(code, f"{self.name}: failing with {code.name} (attempt {attempt})")
        self._ok(context, ("x-attempt", str(attempt)))
        return b"ok"

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        try:
            deadline = time.monotonic() + int(request) / 1000
        except ValueError:
            context.set_trailing_metadata((("x-backend", self.name),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Sleep wants milliseconds")
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        self._ok(context)
        return request

    def info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        served = self._count()
        self._ok(context)
        metadata = [[m.key, m.value if isinstance(m.value, str) else m.value.hex()]
                    for m in context.invocation_metadata()]
        return json.dumps({"name": self.name, "method": "Info", "metadata": metadata,
                           "authority": authority(context), "peer": context.peer(),
                           "served": served}).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "BidiStream": grpc.stream_stream_rpc_method_handler(self.bidi_stream),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "Info": grpc.unary_unary_rpc_method_handler(self.info),
        })


def authority(context: grpc.ServicerContext) -> str | None:
    """The call's :authority; grpcio has no public accessor, so this reads its call
    details (None if that private attribute ever goes away)."""
    details = getattr(getattr(context, "_rpc_event", None), "call_details", None)
    host = getattr(details, "host", None)
    return host.decode("utf-8", "replace") if isinstance(host, bytes) else host


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_server(name: str, host: str = "::", port: int = 0,
                 workers: int = 64) -> tuple[grpc.Server, int]:
    """A started server of test.Echo and the port it listens on."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         handlers=[EchoService(name).handler()], options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=workers)
    bound = server.add_insecure_port(bind_address(host, port))
    if not bound:
        raise OSError(f"cannot listen on {bind_address(host, port)}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.testbed.grpc_backend",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="0: a free port")
    parser.add_argument("--host", default="::", help="address to bind ('::' = dual stack)")
    parser.add_argument("--name", default=os.environ.get("PEER_NAME") or socket.gethostname(),
                        help="sent as x-backend metadata")
    parser.add_argument("--workers", type=int, default=64, help="calls served at once at most")
    args = parser.parse_args(argv)
    server, port = start_server(args.name, args.host, args.port, args.workers)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    emit({"listening": bind_address(args.host, port), "name": args.name, "pid": os.getpid(),
          "ready": True})
    while not stop.wait(1.0):
        pass
    server.stop(grace=1.0).wait(5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
