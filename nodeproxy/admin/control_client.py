"""A small client for the daemon's control socket (HTTP over a Unix socket)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

DEFAULT_SOCKET = "/run/nodeproxy/control.sock"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def request(socket_path: str, method: str, path: str, body: Any = None,
            timeout: float = 30.0) -> tuple[int, Any]:
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()
