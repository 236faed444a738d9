"""Many hostile requests from one process, each on a connection of its own: HTTP/1.1 as
exact bytes (nodeproxy_dev.testbed.raw_exchange), HTTP/2 as header blocks the ``h2`` library
sends with every check of its own turned off (so malformed pseudo-headers, absolute
``:path``, repeated fields and uppercase names go out as written).

    python -m nodeproxy_dev.testbed.raw_batch REQUESTS.json

REQUESTS.json is a list of objects: ``{"kind": "h1", "host", "port", "data_hex"}`` or
``{"kind": "h2", "host", "port", "headers": [[name, value], ...]}``.  Prints one JSON
list, in the same order: for h1 raw_exchange's result; for h2 ``status`` (None if no
response head), ``body_hex``, ``reset`` (the stream's RST_STREAM code), ``goaway``
(the GOAWAY code) and ``error``.  Requests run 16 at a time; each is bounded by
``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h2.config
import h2.connection
import h2.events

from nodeproxy_dev.testbed.raw_exchange import exchange


def h2_request(host: str, port: int, headers: list[tuple[str, str]],
               seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"status": None, "body_hex": "", "reset": None, "goaway": None,
                           "error": None}
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False, header_encoding="latin-1"))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + seconds
    body = bytearray()
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(seconds)
            sock.connect((host, port))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(n.encode("latin-1"), v.encode("latin-1"))
                                    for n, v in headers], end_stream=True)
            sock.sendall(conn.data_to_send())
            done = False
            while not done and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    break
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        out["status"] = int(dict(event.headers)[":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        done = True
                    elif isinstance(event, h2.events.StreamReset):
                        out["reset"] = int(event.error_code)
                        done = True
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        out["goaway"] = int(event.error_code)
                        done = True
                pending = conn.data_to_send()
                if pending:
                    sock.sendall(pending)
    except Exception as e:  # reported, never raised: one request's failure is a result
        out["error"] = f"{type(e).__name__}: {e}"
    out["body_hex"] = bytes(body).hex()
    return out


def run_one(request: dict[str, Any], seconds: float) -> dict[str, Any]:
    if request["kind"] == "h1":
        return exchange(request["host"], int(request["port"]),
                        [bytes.fromhex(request["data_hex"])], 0.0, seconds, True)
    return h2_request(request["host"], int(request["port"]),
                      [(str(n), str(v)) for n, v in request["headers"]], seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requests", help="a JSON file: the list of requests")
    parser.add_argument("--seconds", type=float, default=5.0, help="bound per request")
    args = parser.parse_args(argv)
    with open(args.requests) as f:
        requests = json.load(f)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: run_one(r, args.seconds), requests))
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
