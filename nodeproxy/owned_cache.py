"""A bounded cache whose entries are grouped by the peer that caused them, so a hostile
peer that floods it with distinct keys forgets only its own.

The proxy remembers policy decisions (http/authorize.py's allowed verdicts,
policy/admission.py's request decisions) so a repeated request costs a lookup.  A cache
that is emptied whole when full lets one pod, sending distinct paths, make every other
pod's requests be judged afresh again and again.  Here, when the cache holds ``limit``
entries, the group of the owner holding the most is dropped: a flooder holds the most,
so it loses its own entries and the others keep theirs.  Compiled in a compiled build
(the request path calls it).

The largest group is found without a scan of every group: owners are indexed by how many
entries they hold.  A peer that names thousands of owners (forged identities where nodes
hold the CA key, a plaintext client's many IPv6 addresses) with one entry each made
every put, once full, scan them all (105 us per put with 4,096 groups, pure Python;
review8)."""

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
        # Owners by the number of entries they hold, each size's in the order they
        # reached it (the first there is dropped first), and the largest size held.
        self._by_size: dict[int, dict[Hashable, None]] = {}
        self._most = 0

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
        held = len(group)
        if held:
            self._leave(held, owner)
        group[key] = value
        held += 1
        bucket = self._by_size.get(held)
        if bucket is None:
            bucket = self._by_size[held] = {}
        bucket[owner] = None
        if held > self._most:
            self._most = held
        self.size += 1

    def held_by(self, owner: Hashable) -> int:
        group = self._groups.get(owner)
        return 0 if group is None else len(group)

    def keys(self) -> list[Hashable]:
        return [key for group in self._groups.values() for key in group]

    def _leave(self, held: int, owner: Hashable) -> None:
        """The owner no longer holds `held` entries."""
        bucket = self._by_size[held]
        del bucket[owner]
        if not bucket:
            del self._by_size[held]

    def _drop_largest(self) -> None:
        most = self._most
        largest = next(iter(self._by_size[most]))
        self._leave(most, largest)
        self.size -= len(self._groups.pop(largest))
        while most > 0 and most not in self._by_size:  # each step paid for by a put
            most -= 1
        self._most = most
