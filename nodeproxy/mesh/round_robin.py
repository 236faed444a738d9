"""Endpoint selection.  Round robin per service port; per-request policies come with L7."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundRobin:
    """Cycles through each key's candidates in order, independently per key."""

    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}

    def pick(self, service: Hashable, port: int, candidates: Sequence[T]) -> T:
        key = (service, port)
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return candidates[index % len(candidates)]
