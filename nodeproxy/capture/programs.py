"""Compile, load, attach and pin the eBPF programs (bpf/*.c) for one node.

One bcc compile unit holds every program and map: bcc makes programs only of functions in
its main text, so the sources (capture.c, inbound.c, splice.c, redirect.c) are
concatenated; each includes common.h (and through it maps.h, every map), so their order
does not matter.  Which programs are loaded and attached depends on the capture mode:

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
  daemon work on the same pods, original destinations, counters and rules;
- links/<instance>/: each instance's links, only in fail_closed mode, so a crashed
  daemon leaves capture in place and pods' outbound connections are refused, not
  leaked out of the mesh, until a new instance removes the stale state and takes over.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeproxy.capture import constants, contract, libbpf
from nodeproxy.ports import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT

log = logging.getLogger(__name__)

SOURCES = ("capture.c", "inbound.c", "splice.c", "redirect.c")
# What every source includes: the shared declarations, and the maps and their layouts.
HEADERS = ("common.h", "maps.h")

# UAPI values (bcc 0.26 lacks names for some of them).
PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_SK_LOOKUP = 30
PROG_SK_SKB = 14
PROG_CGROUP_SOCKOPT = 25
PROG_SK_MSG = 16
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30
ATTACH_SK_LOOKUP = 36
ATTACH_SK_SKB_STREAM_VERDICT = 5
ATTACH_SK_MSG_VERDICT = 7


@dataclass(frozen=True)
class ProgramSpec:
    name: str         # link name and pin file
    function: str     # C function
    prog_type: int
    attach_type: int


CGROUP_PROGRAMS = (
    ProgramSpec("connect4", "np_connect4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT),
    ProgramSpec("connect6", "np_connect6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT),
    ProgramSpec("getpeername4", "np_getpeername4", PROG_CGROUP_SOCK_ADDR,
                ATTACH_INET4_GETPEERNAME),
    ProgramSpec("getpeername6", "np_getpeername6", PROG_CGROUP_SOCK_ADDR,
                ATTACH_INET6_GETPEERNAME),
    ProgramSpec("sockops", "np_sockops", PROG_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS),
)
SOCKOPS_PROGRAM = CGROUP_PROGRAMS[-1]
INBOUND_PROGRAM = ProgramSpec("inbound", "np_inbound_lookup", PROG_SK_LOOKUP, ATTACH_SK_LOOKUP)
ORIGINAL_DST_PROGRAM = ProgramSpec("original_dst", "np_original_dst", PROG_CGROUP_SOCKOPT,
                                   ATTACH_CGROUP_GETSOCKOPT)
# Attached to the np_splice_sockets sockhash (a map, not a cgroup or netns): it needs no
# capture hook, so it is loaded in both capture modes.
SPLICE_PROGRAM = ProgramSpec("splice", "np_splice_verdict", PROG_SK_SKB,
                             ATTACH_SK_SKB_STREAM_VERDICT)
# Attached to the np_msg_sockets sockhash: the sk_msg fast path (bpf/redirect.c).
MSG_REDIRECT_PROGRAM = ProgramSpec("msg_redirect", "np_msg_redirect", PROG_SK_MSG,
                                   ATTACH_SK_MSG_VERDICT)
ALL_PROGRAMS = (*CGROUP_PROGRAMS, INBOUND_PROGRAM, ORIGINAL_DST_PROGRAM, SPLICE_PROGRAM,
                MSG_REDIRECT_PROGRAM)
CAPTURE_MODES = ("ebpf", "iptables")


def bpf_source_dir() -> Path:
    """Where the C sources are: $NODEPROXY_BPF_DIR, the source tree, or the system share."""
    candidates = [
        os.environ.get("NODEPROXY_BPF_DIR"),
        str(Path(__file__).resolve().parents[2] / "bpf"),
        "/usr/share/nodeproxy/bpf",
    ]
    for candidate in candidates:
        if candidate and all((Path(candidate) / f).is_file() for f in (*SOURCES, *HEADERS)):
            return Path(candidate)
    raise FileNotFoundError(
        f"bpf/{' and bpf/'.join((*SOURCES, *HEADERS))} not found "
        "(set NODEPROXY_BPF_DIR to their directory)"
    )


def compile_programs(bcc: Any, maps_dir: str | Path, *, outbound_port: int = OUTBOUND_PORT,
                     inbound_port: int = INBOUND_PORT, hbone_port: int = HBONE_PORT,
                     sources: Sequence[str] = SOURCES) -> Any:
    """Compile every program into one bcc.BPF object; its maps are pinned in maps_dir (a
    bpffs directory), reusing maps already pinned there.  Nothing is attached.
    sources: SOURCES in any order (the order must not matter; a test compiles others)."""
    if sorted(sources) != sorted(SOURCES):
        raise ValueError(f"sources must be {SOURCES} in some order, not {tuple(sources)}")
    src = bpf_source_dir()
    Path(maps_dir).mkdir(parents=True, exist_ok=True)
    # One text: bcc only makes programs of functions in the main file, not in includes.
    text = "\n".join((src / name).read_text() for name in sources)
    return bcc.BPF(text=text.encode(), cflags=[
        f"-I{src}", *constants.cflags(str(maps_dir), outbound_port, inbound_port, hbone_port)])


def load_program(bpf: Any, spec: ProgramSpec) -> Any:
    """Load one program into the kernel (the verifier runs here)."""
    return bpf.load_func(spec.function.encode(), spec.prog_type, attach_type=spec.attach_type)


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
        self.bpf: Any = None
        self._links: list[_Link] = []
        self._netns_links: dict[str, _Link] = {}
        self._inbound_fd = -1

    @property
    def specs(self) -> tuple[ProgramSpec, ...]:
        """The programs this mode loads: a kernel without the cgroup/connect, sk_lookup
        or getsockopt hooks must not be asked to load them in iptables mode."""
        return ALL_PROGRAMS if self.mode == "ebpf" else (
            SOCKOPS_PROGRAM, SPLICE_PROGRAM, MSG_REDIRECT_PROGRAM)

    def load(self) -> None:
        """Compile with bcc and load this mode's programs (the verifier runs here)."""
        import bcc  # Debian's python3-bpfcc; imported late so unit tests need no bcc

        self.bpf = compile_programs(bcc, self.pins / "maps", **self.ports)
        contract.check_compiled(self.bpf)  # the daemon's view of every map is the C one
        self._funcs = {spec.name: load_program(self.bpf, spec) for spec in self.specs}
        if INBOUND_PROGRAM.name in self._funcs:
            self._inbound_fd = self._funcs[INBOUND_PROGRAM.name].fd
        # The splice verdict handles data of the sockets in np_splice_sockets; a map
        # attachment lives as long as the map, which is this instance's alone.
        bcc.BPF.attach_func(self._funcs[SPLICE_PROGRAM.name],
                            contract.map_fd(self.bpf, contract.SPLICE_SOCKETS),
                            SPLICE_PROGRAM.attach_type)
        # Likewise the sk_msg verdict runs on every send of the sockets in np_msg_sockets.
        bcc.BPF.attach_func(self._funcs[MSG_REDIRECT_PROGRAM.name],
                            contract.map_fd(self.bpf, contract.MSG_SOCKETS),
                            MSG_REDIRECT_PROGRAM.attach_type)

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
        assert self.bpf is not None, "load() first"
        targets = [(spec, self.pod_cgroup) for spec in CGROUP_PROGRAMS if spec in self.specs]
        if self.mode == "ebpf":
            if not self.own_cgroup:
                raise ValueError("ebpf capture needs the daemon's own cgroup (own_cgroup)")
            targets.append((ORIGINAL_DST_PROGRAM, self.own_cgroup))
        for spec, cgroup in targets:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._links.append(self._link(spec.name, self._funcs[spec.name].fd,
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
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


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
