"""MeshState: the one reference to the mesh snapshot in force, which every component reads.

Listeners, the tunnel server, the upstream dialer and the HTTP layer read
`state.current` when they decide (one attribute read; no getter per field, no copy pushed
into them).  The daemon swaps in a new snapshot with `replace`: one assignment, so a
reader sees the old snapshot or the new one, never a mix.  Then the watchers run, in the
order they were added, for what must follow a new state at once rather than at the next
read: caches derived from it that own resources (the HTTP layer's pools) and the kernel's
deny map.  (ztunnel's policy store notifies its connection manager the same way.)

A watcher that writes the node's shared kernel state (the deny map, the probe rules) is
added with ``writes_kernel``: once this instance hands the node over to a new one
(`hand_kernel_over`), those are no longer called, while the others (the HTTP layer's
pools, the revocation of connections still draining here) go on following each snapshot.
"""

from __future__ import annotations

from collections.abc import Callable

from nodeproxy.mesh.snapshot import MeshSnapshot

Watcher = Callable[[MeshSnapshot], None]


class MeshState:
    def __init__(self, initial: MeshSnapshot):
        # A plain attribute, not a property: the request path reads it per request
        # (http/authorize.py), and a property of this interpreted class is an
        # interpreted call each time ("L7 per-request cost, thirteenth round").  Only
        # `replace` assigns it.
        self.current = initial
        self._watchers: list[tuple[Watcher, bool]] = []
        self._kernel_ours = True

    def replace(self, snapshot: MeshSnapshot) -> None:
        """Put a new snapshot in force, then tell the watchers."""
        self.current = snapshot
        for watcher, writes_kernel in self._watchers:
            if self._kernel_ours or not writes_kernel:
                watcher(snapshot)

    def watch(self, watcher: Watcher, *, writes_kernel: bool = False) -> None:
        """Call `watcher` with every snapshot put in force from now on (a component that
        derives state reads `current` once when it starts); one that ``writes_kernel``
        only while this instance runs the node."""
        self._watchers.append((watcher, writes_kernel))

    def hand_kernel_over(self) -> None:
        """Another instance runs the node now: its kernel state is not ours to write."""
        self._kernel_ours = False
