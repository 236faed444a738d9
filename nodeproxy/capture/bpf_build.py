"""What bcc builds: the eBPF sources (bpf/*.c), the programs in them and how each is
loaded, and the compile itself.

bcc is the build tool and runs only where programs are compiled: in the short-lived child
that loads the daemon's programs (nodeproxy.capture.load_child), in `nodeproxy check`
(preflight) and in tests; the daemon itself never imports it.  bcc is passed in, so this
module imports without it.

One bcc compile unit holds every program and map: bcc makes programs only of functions in
its main text, so the sources (capture.c, inbound.c, splice.c, redirect.c) are
concatenated; each includes common.h (and through it maps.h, every map), so their order
does not matter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeproxy.capture import constants
from nodeproxy.ports import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT

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


def mode_programs(mode: str) -> tuple[ProgramSpec, ...]:
    """The programs a capture mode loads: a kernel without the cgroup/connect, sk_lookup
    or getsockopt hooks must not be asked to load them in iptables mode."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"unknown capture mode {mode!r}")
    return ALL_PROGRAMS if mode == "ebpf" else (
        SOCKOPS_PROGRAM, SPLICE_PROGRAM, MSG_REDIRECT_PROGRAM)


# The verdicts attached to a sockhash (in the loading child), not by the daemon.
MAP_ATTACHED = {SPLICE_PROGRAM.name: "np_splice_sockets",
                MSG_REDIRECT_PROGRAM.name: "np_msg_sockets"}
