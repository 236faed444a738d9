"""Send exact bytes on one TCP connection and report what came back: the adversarial
tests' client for requests no well-behaved library would write (smuggling, malformed
targets, repeated headers, slow writes).

    python -m nodeproxy_dev.testbed.raw_exchange --host H --port P --send-hex HEX
        [--then-hex HEX --gap S]... [--read-seconds S] [--half-close]

Each ``--send-hex`` / ``--then-hex`` is one write, ``--gap`` seconds apart (reads go on
meanwhile); after the last write it reads until the peer closes or ``--read-seconds``
pass.  One JSON line: ``received_hex``, ``closed_by_peer``, ``reset``, ``error``,
``connect_error``, ``seconds``.  Every run is bounded by its own timers.
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def exchange(host: str, port: int, writes: list[bytes], gap: float, read_seconds: float,
             half_close: bool, connect_timeout: float = 5.0) -> dict[str, object]:
    start = time.monotonic()
    out: dict[str, object] = {"received_hex": "", "closed_by_peer": False, "reset": False,
                              "error": None, "connect_error": None}
    received = bytearray()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect((host, port))
    except OSError as e:
        out["connect_error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = time.monotonic() - start
        sock.close()
        return out

    def read_until(deadline: float) -> bool:
        """Read until the deadline; True when the connection ended."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                out["reset"] = True
                return True
            if not data:
                out["closed_by_peer"] = True
                return True
            received.extend(data)

    try:
        ended = False
        for i, data in enumerate(writes):
            if i and gap > 0:
                ended = read_until(time.monotonic() + gap)
                if ended:
                    break
            sock.sendall(data)
        if not ended:
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            read_until(time.monotonic() + read_seconds)
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["reset"] = out["reset"] or isinstance(e, (ConnectionResetError, BrokenPipeError))
    finally:
        sock.close()
    out["received_hex"] = received.hex()
    out["seconds"] = time.monotonic() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--send-hex", required=True, help="the first write, hex")
    parser.add_argument("--then-hex", action="append", default=[],
                        help="a later write, hex (repeatable)")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between writes")
    parser.add_argument("--read-seconds", type=float, default=3.0)
    parser.add_argument("--half-close", action="store_true",
                        help="shut down the sending side after the last write")
    args = parser.parse_args(argv)
    writes = [bytes.fromhex(args.send_hex), *(bytes.fromhex(h) for h in args.then_hex)]
    print(json.dumps(exchange(args.host, args.port, writes, args.gap, args.read_seconds,
                              args.half_close)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
