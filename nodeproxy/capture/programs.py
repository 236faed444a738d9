"""Load, attach and pin the eBPF programs (bpf/*.c) for one node.

The programs are compiled (bcc) and loaded in a short-lived child process
(nodeproxy.capture.load_child), which hands this daemon a descriptor of each program and
map: the daemon never imports bcc, so never maps its LLVM.  Maps are then reached through
map_access (libbpf).  Which programs are loaded and attached depends on the capture mode
(bpf_build.mode_programs):

- ebpf: the cgroup programs (connect4/6, getpeername4/6, sockops) attach to the
  node's pod cgroup subtree; np_original_dst (cgroup/getsockopt) to the daemon's
  own cgroup, where the sockets the proxy accepts belong; the inbound sk_lookup
  program to each enrolled pod's network namespace;
- iptables: of the cgroup programs only sockops (the per-pod kernel counters), on the
  pod cgroup subtree; iptables rules do the capturing (nodeproxy.capture.iptables).

In both, the splice and sk_msg verdicts attach to their own (per-instance) sockhashes.

Pins live under <bpffs>/nodeproxy/<node>/:
- maps/: every shared map, pinned by bcc at creation (BPF_TABLE_PINNED) and found
  again by the next instance's compile; so during an upgrade the old and the new
  daemon work on the same pods, original destinations, counters and rules (the
  per-instance maps are pinned nowhere: they go with the daemon's descriptors);
- links/<instance>/: each instance's links, only in fail_closed mode, so a crashed
  daemon leaves capture in place and pods' outbound connections are refused, not
  leaked out of the mesh, until a new instance removes the stale state and takes over.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from nodeproxy.capture import libbpf
from nodeproxy.capture.bpf_build import (
    CAPTURE_MODES,
    CGROUP_PROGRAMS,
    INBOUND_PROGRAM,
    ORIGINAL_DST_PROGRAM,
    ProgramSpec,
    mode_programs,
)
from nodeproxy.capture.load_child import LoadRequest, load_in_child
from nodeproxy.capture.map_access import MapSet

log = logging.getLogger(__name__)

def pin_root(bpffs: str, node: str) -> Path:
    return Path(bpffs) / "nodeproxy" / node


@dataclass
class _Link:
    name: str
    fd: int
    pin_path: Path | None


class CapturePrograms:
    """The loaded programs of one node and everything they attached and pinned."""

    def __init__(self, *, node: str, pod_cgroup: str, bpffs: str, outbound_port: int,
                 inbound_port: int, hbone_port: int, pin_links: bool, mode: str = "ebpf",
                 own_cgroup: str | None = None):
        if mode not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {mode!r}")
        self.node = node
        self.pod_cgroup = pod_cgroup
        self.mode = mode
        # Where the daemon's sockets belong (ebpf mode answers SO_ORIGINAL_DST there).
        self.own_cgroup = own_cgroup
        self.pins = pin_root(bpffs, node)
        self.ports = {"outbound_port": outbound_port, "inbound_port": inbound_port,
                      "hbone_port": hbone_port}
        self.pin_links = pin_links
        # Unique across instances: in a DaemonSet every daemon is PID 1 of its container.
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.maps: MapSet | None = None  # set by load()
        self._prog_fds: dict[str, int] = {}
        self._links: list[_Link] = []
        self._netns_links: dict[str, _Link] = {}
        self._inbound_fd = -1

    @property
    def specs(self) -> tuple[ProgramSpec, ...]:
        """The programs this mode loads (bpf_build.mode_programs)."""
        return mode_programs(self.mode)

    def load(self) -> float:
        """Compile and load this mode's programs in a child process (the verifier runs
        there; its errors are raised here); returns the child's seconds.  The child also
        attaches the splice and sk_msg verdicts to their sockhashes (a map attachment
        lives as long as the map, which is this instance's alone)."""
        loaded = load_in_child(LoadRequest(
            maps_dir=str(self.pins / "maps"), mode=self.mode, **self.ports))
        self._prog_fds = loaded.programs
        self.maps = MapSet(loaded.maps)
        self._inbound_fd = self._prog_fds.get(INBOUND_PROGRAM.name, -1)
        return loaded.seconds

    def _link(self, name: str, prog_fd: int, target_fd: int, attach_type: int) -> _Link:
        fd = libbpf.link_create(prog_fd, target_fd, attach_type)
        pin_path = None
        if self.pin_links:
            pin_path = self.pins / "links" / self.instance / name
            pin_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                libbpf.pin(fd, str(pin_path))
            except OSError:
                os.close(fd)
                raise
        return _Link(name, fd, pin_path)

    def attach(self) -> None:
        """Attach this mode's cgroup programs as BPF links: to the pod cgroup subtree, and
        (ebpf) the SO_ORIGINAL_DST answer to the daemon's own cgroup."""
        assert self.maps is not None, "load() first"
        targets = [(spec, self.pod_cgroup) for spec in CGROUP_PROGRAMS if spec in self.specs]
        if self.mode == "ebpf":
            if not self.own_cgroup:
                raise ValueError("ebpf capture needs the daemon's own cgroup (own_cgroup)")
            targets.append((ORIGINAL_DST_PROGRAM, self.own_cgroup))
        for spec, cgroup in targets:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._links.append(self._link(spec.name, self._prog_fds[spec.name],
                                              cgroup_fd, spec.attach_type))
            finally:
                os.close(cgroup_fd)
            log.info("attached %s to %s", spec.function, cgroup)

    def attach_netns(self, key: str, netns_fd: int) -> None:
        """Attach inbound capture (sk_lookup) to one pod's network namespace."""
        pin_name = "inbound-" + key.replace("/", "_")
        link = self._link(pin_name, self._inbound_fd, netns_fd, INBOUND_PROGRAM.attach_type)
        self._netns_links[key] = link

    def detach_netns(self, key: str) -> None:
        link = self._netns_links.pop(key, None)
        if link is not None:
            _close_link(link)

    def detach(self) -> None:
        """Detach every link of this instance (cgroup and netns) and remove their pins."""
        for key in list(self._netns_links):
            self.detach_netns(key)
        for link in self._links:
            _close_link(link)
            log.info("detached %s", link.name)
        self._links.clear()
        shutil.rmtree(self.pins / "links" / self.instance, ignore_errors=True)

    def close(self, keep_maps: bool = False) -> None:
        """Detach, free the programs, and (unless another instance took over and uses
        them: keep_maps) remove every pin of the node.  Safe to call twice."""
        self.detach()
        if not keep_maps:
            remove_pins(self.pins)
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()
        self._inbound_fd = -1
        if self.maps is not None:
            self.maps.close()
            self.maps = None


def _close_link(link: _Link) -> None:
    if link.pin_path is not None:
        link.pin_path.unlink(missing_ok=True)
    os.close(link.fd)


def remove_pins(pins: Path) -> list[str]:
    """Remove a node's pin directory (links and maps); returns what was there.

    Removing a pinned link's file detaches it once no process holds it, so
    this is also how a new instance clears what a crashed one left attached.
    """
    if not pins.exists():
        return []
    found = sorted(str(p) for p in pins.rglob("*") if not p.is_dir())
    shutil.rmtree(pins, ignore_errors=True)
    parent = pins.parent
    if parent.name == "nodeproxy" and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
    return found
