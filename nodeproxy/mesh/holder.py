"""MeshState: the one reference to the mesh snapshot in force, which every component reads.

Listeners, the tunnel server, the upstream dialer and the HTTP layer read
`state.current` when they decide (one attribute read; no getter per field, no copy pushed
into them).  The daemon swaps in a new snapshot with `replace`: one assignment, so a
reader sees the old snapshot or the new one, never a mix.  Then the watchers run, in the
order they were added, for what must follow a new state at once rather than at the next
read: caches derived from it that own resources (the HTTP layer's pools) and the kernel's
deny map.  (ztunnel's policy store notifies its connection manager the same way.)
"""

from __future__ import annotations

from collections.abc import Callable

from nodeproxy.mesh.snapshot import MeshSnapshot

Watcher = Callable[[MeshSnapshot], None]


class MeshState:
    def __init__(self, initial: MeshSnapshot):
        self._current = initial
        self._watchers: list[Watcher] = []

    @property
    def current(self) -> MeshSnapshot:
        return self._current

    def replace(self, snapshot: MeshSnapshot) -> None:
        """Put a new snapshot in force, then tell the watchers."""
        self._current = snapshot
        for watcher in self._watchers:
            watcher(snapshot)

    def watch(self, watcher: Watcher) -> None:
        """Call `watcher` with every snapshot put in force from now on (a component that
        derives state reads `current` once when it starts)."""
        self._watchers.append(watcher)
