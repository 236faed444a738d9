"""The well-behaved HTTP/2 and HTTP/1.1 clients of tests/integration/test_hostile_h2.py,
run inside a test pod: a client that cancels its request in flight (RST_STREAM, or for
HTTP/1.1 a reset connection) and the neighbour's steady HTTP/1.1 client.  The attacks
themselves (rapid reset, control-frame floods) are nodeproxy_dev.testbed.attack's.

    python h2_clients.py cancel --host VIP --path /delay/8000 --wait 1 --seconds 10
    python h2_clients.py cancel-h1 --host VIP --path /delay/8000 --wait 1 --seconds 10
    python h2_clients.py grpc-cancel --host VIP --port 50051 --streams 4 --reset-when FILE
    python h2_clients.py neighbour --host VIP --seconds 10

Every mode is bounded in requests (``--count``) and time (``--seconds``).  The last line
printed is a JSON summary; the neighbour's: requests, statuses, failures, latency
percentiles.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import struct
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


class H2Client:
    """One prior-knowledge h2c connection on a non-blocking socket; what the server
    sends is read and answered by ``h2``, its responses and GOAWAY noted."""

    def __init__(self, host: str, port: int, authority: str, path: str):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setblocking(False)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.headers = [(":method", "GET"), (":path", path), (":scheme", "http"),
                        (":authority", authority)]
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.responses = 0
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        view = memoryview(data)
        while view and not self.closed:
            try:
                sent = self.sock.send(view)
                view = view[sent:]
            except BlockingIOError:
                self.read(0.05)
            except OSError:
                self.closed = True

    def read(self, timeout: float) -> None:
        if self.closed:
            return
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.ResponseReceived):
                self.responses += 1
        self.conn.data_to_send()  # our answers (ACKs) are not the point: drop them


def cancel(args: argparse.Namespace) -> dict[str, Any]:
    """One request; RST_STREAM(CANCEL) after --wait seconds; the connection stays open
    for --seconds more (so only the stream reset can tell the proxy)."""
    f = H2Client(args.host, args.port, args.authority or args.host, args.path)
    sid = f.conn.get_next_available_stream_id()
    f.conn.send_headers(sid, f.headers, end_stream=True)
    f.flush()
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and not f.closed:
        f.read(0.05)
    responded = f.responses
    f.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    f.flush()
    print(json.dumps({"mode": "cancel", "reset": True, "responses_before": responded}),
          flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not f.closed:
        f.read(0.1)
    closed = f.closed
    f.sock.close()
    return {"mode": "cancel", "responses_before": responded, "closed_by_proxy": closed,
            "goaway": None if f.goaway is None else int(f.goaway.error_code)}


def grpc_cancel(args: argparse.Namespace) -> dict[str, Any]:
    """--streams gRPC calls /test.Echo/Sleep of 15 s on one connection; once the file
    --reset-when exists, RST_STREAM(CANCEL) each (the connection stays open); then hold
    it for --seconds."""
    f = H2Client(args.host, args.port, args.authority or args.host, "/test.Echo/Sleep")
    headers = [(":method", "POST"), (":path", "/test.Echo/Sleep"), (":scheme", "http"),
               (":authority", args.authority or args.host),
               ("content-type", "application/grpc"), ("te", "trailers")]
    message = b"15000"
    sids = []
    for _ in range(args.streams):
        sid = f.conn.get_next_available_stream_id()
        f.conn.send_headers(sid, headers)
        f.conn.send_data(sid, b"\0" + len(message).to_bytes(4, "big") + message,
                         end_stream=True)
        sids.append(sid)
    f.flush()
    deadline = time.monotonic() + args.seconds
    while not os.path.exists(args.reset_when) and time.monotonic() < deadline:
        f.read(0.05)
    for sid in sids:
        f.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    f.flush()
    print(json.dumps({"mode": "grpc-cancel", "reset": len(sids)}), flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not f.closed:
        f.read(0.1)
    closed = f.closed
    f.sock.close()
    return {"mode": "grpc-cancel", "reset": len(sids), "responses": f.responses,
            "closed_by_proxy": closed}


def cancel_h1(args: argparse.Namespace) -> dict[str, Any]:
    """HTTP/1.1: one request, then the client resets its connection after --wait seconds
    (SO_LINGER 0; a FIN alone is a half-close the proxy honours); then idles for
    --seconds."""
    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.sendall(f"GET {args.path} HTTP/1.1\r\nhost: {args.authority or args.host}\r\n"
                 "\r\n".encode())
    time.sleep(args.wait)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    print(json.dumps({"mode": "cancel-h1", "closed": True}), flush=True)
    time.sleep(args.seconds)
    return {"mode": "cancel-h1", "closed": True}


def neighbour(args: argparse.Namespace) -> dict[str, Any]:
    """Steady HTTP/1.1 GETs on one keep-alive connection (a new one after a failure)."""
    deadline = time.monotonic() + args.seconds
    statuses: dict[str, int] = {}
    failures: list[str] = []
    latencies: list[float] = []
    conn: http.client.HTTPConnection | None = None
    while time.monotonic() < deadline and len(latencies) + len(failures) < args.count:
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(args.host, args.port, timeout=5)
            conn.request("GET", args.path, headers={"host": args.authority or args.host})
            response = conn.getresponse()
            response.read()
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            latencies.append((time.monotonic() - t0) * 1000)
        except (OSError, http.client.HTTPException) as e:
            failures.append(repr(e))
            if conn is not None:
                conn.close()
            conn = None
        if args.interval:
            time.sleep(args.interval)
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) \
            if latencies else 0.0

    return {"mode": "neighbour", "requests": len(latencies) + len(failures),
            "statuses": statuses, "failures": failures[:20], "failed": len(failures),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["cancel", "cancel-h1", "grpc-cancel", "neighbour"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--authority", default="")
    parser.add_argument("--path", default="/")
    parser.add_argument("--count", type=int, default=10_000, help="neighbour: requests")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--wait", type=float, default=1.0, help="cancel: seconds to reset")
    parser.add_argument("--streams", type=int, default=4, help="grpc-cancel: calls")
    parser.add_argument("--reset-when", default="", help="grpc-cancel: reset once it exists")
    args = parser.parse_args()
    if args.mode == "neighbour":
        result = neighbour(args)
    elif args.mode == "cancel":
        result = cancel(args)
    elif args.mode == "cancel-h1":
        result = cancel_h1(args)
    else:
        result = grpc_cancel(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
