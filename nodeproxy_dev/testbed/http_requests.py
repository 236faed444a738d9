"""A scripted HTTP/1.1 client for the L7 tests, run inside a client pod.

``python -m nodeproxy_dev.testbed.http_requests --url http://10.96.0.10/path -n 100 --json``
sends n requests (over one keep-alive connection unless --new-connections; --interval
seconds apart), bounded in count and by --deadline, and prints what a user would look
at: each status, the x-backend that answered, the body's SHA-256, the latency and when
it was sent (``at``: seconds after the first).  Standard library only
(http.client), so the client is not the code under test.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="http_requests")
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", "--count", type=int, default=1)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", action="append", default=[], help="name: value")
    parser.add_argument("--body-bytes", type=int, default=0)
    parser.add_argument("--new-connections", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between one response and the next request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    body = bytes(i % 251 for i in range(args.body_bytes)) if args.body_bytes else None
    results = []
    connection: http.client.HTTPConnection | None = None
    connections = 0
    first = time.monotonic()
    end = first + args.deadline
    for i in range(args.count):
        if i and args.interval:
            time.sleep(args.interval)
        if time.monotonic() > end:
            break
        if connection is None or args.new_connections:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPConnection(url.hostname, url.port or 80,
                                                    timeout=args.timeout)
            connections += 1
        start = time.monotonic()
        try:
            connection.request(args.method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            results.append({
                "status": response.status, "backend": response.getheader("x-backend"),
                "sha256": hashlib.sha256(data).hexdigest(), "length": len(data),
                "seconds": time.monotonic() - start, "at": start - first,
                "headers": {k.lower(): v for k, v in response.getheaders()},
                "body": data[:2000].decode("utf-8", "replace")})
            if response.will_close:
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as e:
            results.append({"status": None, "error": f"{type(e).__name__}: {e}",
                            "seconds": time.monotonic() - start, "at": start - first})
            connection.close()
            connection = None
    summary = {
        "requests": len(results),
        "connections": connections,
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "backends": dict(Counter(str(r.get("backend")) for r in results)),
        "results": results,
    }
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
