"""A bounded cache whose entries are grouped by the peer that caused them, so a hostile
peer that floods it with distinct keys forgets only its own.

The proxy remembers policy decisions (http/authorize.py's allowed verdicts,
policy/admission.py's request decisions) so a repeated request costs a lookup.  A cache
that is emptied whole when full lets one pod, sending distinct paths, make every other
pod's requests be judged afresh again and again.  Here, when the cache holds ``limit``
entries, the group of the owner holding the most is dropped: a flooder holds the most,
so it loses its own entries and the others keep theirs.  Compiled in a compiled build
(the request path calls it)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class OwnedCache(Generic[V]):
    """At most ``limit`` entries in all, each under its owner (see the module docstring)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self._groups: dict[Hashable, dict[Hashable, V]] = {}

    def get(self, owner: Hashable, key: Hashable) -> V | None:
        group = self._groups.get(owner)
        return None if group is None else group.get(key)

    def put(self, owner: Hashable, key: Hashable, value: V) -> None:
        group = self._groups.get(owner)
        if group is not None and key in group:
            group[key] = value
            return
        if self.size >= self.limit:
            self._drop_largest()
            group = self._groups.get(owner)
        if group is None:
            group = self._groups[owner] = {}
        group[key] = value
        self.size += 1

    def held_by(self, owner: Hashable) -> int:
        group = self._groups.get(owner)
        return 0 if group is None else len(group)

    def keys(self) -> list[Hashable]:
        return [key for group in self._groups.values() for key in group]

    def _drop_largest(self) -> None:
        largest: Hashable = None
        most = -1
        for owner, group in self._groups.items():
            if len(group) > most:
                largest, most = owner, len(group)
        self.size -= len(self._groups.pop(largest))
