"""Compile, load, attach and pin the capture programs (bpf/capture.c) for one node.

Pins live under <bpffs>/nodeproxy/<node>/: maps/ always (for bpftool and the
next instance), links/ only in fail_closed mode, so a crashed daemon leaves
capture in place and pods' outbound connections are refused, not leaked out
of the mesh, until a new instance removes the stale links and takes over.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nodeproxy.capture import constants, libbpf

log = logging.getLogger(__name__)

MAPS_TO_PIN = ("pods", "origdst_by_cookie", "origdst_by_tuple", "pod_stats")


def bpf_source_dir() -> Path:
    """Where the C sources are: $NODEPROXY_BPF_DIR, the source tree, or the system share."""
    candidates = [
        os.environ.get("NODEPROXY_BPF_DIR"),
        str(Path(__file__).resolve().parents[2] / "bpf"),
        "/usr/share/nodeproxy/bpf",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "capture.c").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "bpf/capture.c not found (set NODEPROXY_BPF_DIR to the directory holding it)"
    )


def pin_root(bpffs: str, node: str) -> Path:
    return Path(bpffs) / "nodeproxy" / node


@dataclass
class _Link:
    name: str
    fd: int
    pin_path: Path | None


class CapturePrograms:
    """The loaded capture programs of one node and everything they attached and pinned."""

    def __init__(self, *, node: str, pod_cgroup: str, bpffs: str, outbound_port: int,
                 pin_links: bool):
        self.node = node
        self.pod_cgroup = pod_cgroup
        self.pins = pin_root(bpffs, node)
        self.outbound_port = outbound_port
        self.pin_links = pin_links
        self.bpf = None
        self._links: list[_Link] = []

    def load(self) -> None:
        """Compile with bcc and load into the kernel (the verifier runs here)."""
        from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests need no bcc

        src = bpf_source_dir()
        self.bpf = BPF(
            src_file=str(src / "capture.c"),
            cflags=[f"-I{src}", *constants.cflags(self.outbound_port)],
        )

    def attach(self) -> None:
        """Attach connect4/6, getpeername4/6 and sockops to the pod cgroup subtree as BPF links."""
        from bcc import BPF, BPFAttachType

        assert self.bpf is not None, "load() first"
        programs = [
            ("connect4", "np_connect4", BPF.CGROUP_SOCK_ADDR,
             BPFAttachType.CGROUP_INET4_CONNECT),
            ("connect6", "np_connect6", BPF.CGROUP_SOCK_ADDR,
             BPFAttachType.CGROUP_INET6_CONNECT),
            ("getpeername4", "np_getpeername4", BPF.CGROUP_SOCK_ADDR,
             BPFAttachType.CGROUP_INET4_GETPEERNAME),
            ("getpeername6", "np_getpeername6", BPF.CGROUP_SOCK_ADDR,
             BPFAttachType.CGROUP_INET6_GETPEERNAME),
            ("sockops", "np_sockops", BPF.SOCK_OPS, BPFAttachType.CGROUP_SOCK_OPS),
        ]
        cgroup_fd = os.open(self.pod_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, func_name, prog_type, attach_type in programs:
                if prog_type == BPF.CGROUP_SOCK_ADDR:
                    func = self.bpf.load_func(func_name, prog_type, attach_type=attach_type)
                else:
                    func = self.bpf.load_func(func_name, prog_type)
                fd = libbpf.link_create(func.fd, cgroup_fd, int(attach_type))
                pin_path = None
                if self.pin_links:
                    pin_path = self.pins / "links" / name
                    pin_path.parent.mkdir(parents=True, exist_ok=True)
                    libbpf.pin(fd, str(pin_path))
                self._links.append(_Link(name, fd, pin_path))
                log.info("attached %s to %s", func_name, self.pod_cgroup)
        finally:
            os.close(cgroup_fd)

    def pin_maps(self) -> None:
        assert self.bpf is not None
        maps_dir = self.pins / "maps"
        maps_dir.mkdir(parents=True, exist_ok=True)
        for name in MAPS_TO_PIN:
            libbpf.pin(self.bpf[name].map_fd, str(maps_dir / name))

    def close(self) -> None:
        """Detach every link, remove every pin, free the programs.  Safe to call twice."""
        for link in self._links:
            if link.pin_path is not None:
                link.pin_path.unlink(missing_ok=True)
            os.close(link.fd)
            log.info("detached %s from %s", link.name, self.pod_cgroup)
        self._links.clear()
        remove_pins(self.pins)
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


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
