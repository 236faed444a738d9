"""A bounded hostile client: hold many idle connections, or drip request heads (slowloris).
For the fair-share tests; every run is bounded in count and time.

    python -m nodeproxy.testbed.flood hold --host H --port P --count N [--send-hex HEX]
        [--rate R] [--settle S] [--hold S]
    python -m nodeproxy.testbed.flood slowloris --host H --port P --count N
        [--interval S] [--duration S] [--silent]

hold: opens N connections one after another, at most ``--rate`` a second if given (each
may first write the given bytes), waits
``--settle`` seconds, then reports how many are still open and how many the peer reset or
closed (one JSON line, ``"phase": "held"``); keeps the open ones until ``--hold`` seconds
have passed or stdin reaches EOF, closes them and prints a final line.

slowloris: opens N connections, writes ``GET / HTTP/1.1\\r\\nHost: x\\r\\nX-A: `` on each and
then one more header byte every ``--interval`` seconds, never ending the head; reports, per
connection, when (seconds after its connect) the peer closed it and the first bytes it
answered, or that it was still open after ``--duration``.  ``--silent``: send nothing.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import sys
import time


def _connect(host: str, port: int, timeout: float) -> socket.socket | str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError as e:
        sock.close()
        return type(e).__name__
    sock.setblocking(False)
    return sock


def _state(sock: socket.socket, received: bytearray) -> str:
    """open, reset or closed (EOF), without blocking; what the peer sent is read into
    `received` on the way."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return "open"
        except ConnectionResetError:
            return "reset"
        except OSError as e:
            return "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else "closed"
        if not data:
            return "closed"
        received.extend(data)


def hold(args: argparse.Namespace) -> dict[str, object]:
    payload = bytes.fromhex(args.send_hex) if args.send_hex else b""
    socks: list[socket.socket] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    for i in range(args.count):
        if time.monotonic() - start > args.hold:
            break
        if args.rate:
            time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        sock = _connect(args.host, args.port, args.connect_timeout)
        if isinstance(sock, str):
            errors[sock] = errors.get(sock, 0) + 1
            continue
        if payload:
            try:
                sock.send(payload)
            except OSError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        socks.append(sock)
    time.sleep(args.settle)
    answers = [bytearray() for _ in socks]
    states = [_state(s, a) for s, a in zip(socks, answers, strict=True)]
    held = {"phase": "held", "connected": len(socks), "open": states.count("open"),
            "reset": states.count("reset"), "closed": states.count("closed"),
            "answers": [bytes(a[:64]).decode("latin-1") for a in answers],
            "connect_errors": errors, "seconds": round(time.monotonic() - start, 3)}
    print(json.dumps(held), flush=True)
    deadline = start + args.hold
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], min(0.5, deadline - time.monotonic()))
        if ready and not sys.stdin.readline():
            break
    states = [_state(s, bytearray()) for s in socks]
    for sock in socks:
        sock.close()
    return {"phase": "done", "open_at_end": states.count("open"),
            "seconds": round(time.monotonic() - start, 3)}


def slowloris(args: argparse.Namespace) -> dict[str, object]:
    start = time.monotonic()
    conns: list[dict[str, object]] = []
    socks: dict[socket.socket, dict[str, object]] = {}
    for _ in range(args.count):
        sock = _connect(args.host, args.port, args.connect_timeout)
        if isinstance(sock, str):
            conns.append({"connect_error": sock})
            continue
        info: dict[str, object] = {"opened": time.monotonic(), "closed_after": None,
                                   "received": ""}
        conns.append(info)
        socks[sock] = info
        if args.silent:
            continue
        try:
            sock.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: ")
        except OSError:
            pass
    next_drip = time.monotonic() + args.interval
    deadline = start + args.duration
    while socks and time.monotonic() < deadline:
        readable, _, _ = select.select(list(socks), [], [],
                                       max(0.0, min(next_drip, deadline) - time.monotonic()))
        for sock in readable:
            info = socks[sock]
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:
                info["received"] = (str(info["received"]) + data.decode("latin-1"))[:64]
                continue
            info["closed_after"] = round(time.monotonic() - float(info["opened"]), 3)  # type: ignore[arg-type]
            del socks[sock]
            sock.close()
        if time.monotonic() >= next_drip and not args.silent:
            next_drip += args.interval
            for sock in list(socks):
                try:
                    sock.send(b"a")
                except OSError:
                    pass  # the read side reports the close
    for sock in socks:
        sock.close()
    for info in conns:
        info.pop("opened", None)
    return {"connections": conns, "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("hold", "slowloris"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--send-hex", default="")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="hold: connections per second (0: one after another at once)")
    parser.add_argument("--silent", action="store_true",
                        help="slowloris: send nothing at all, only measure when it closes")
    parser.add_argument("--connect-timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.count > 5000 or args.hold > 300 or args.duration > 300:
        parser.error("bounded: at most 5000 connections and 300 seconds")
    result = hold(args) if args.mode == "hold" else slowloris(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
