"""The L4 endpoint choice: round robin per service port, for connections relayed as bytes.

Each (service, port) starts at its first endpoint.  Requests the HTTP proxy handles are
balanced per request by nodeproxy/http/balancer.py instead (its round robin starts at a
random place).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


class PortRoundRobin:
    """Cycles through each (service, port)'s candidates in order, independently per key."""

    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}

    def pick(self, service: Hashable, port: int, candidates: Sequence[T]) -> T:
        key = (service, port)
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return candidates[index % len(candidates)]
