"""bpf/*.c compiles against every kernel's headers that bcc 0.26 (Debian 12) meets.

From Linux 6.10 on, the kernel's internal include/linux/bpf.h takes sizeof(struct
bpf_wq); bcc 0.26 compiles against its own copy of uapi/linux/bpf.h, which predates
bpf_wq, so any program that pulls include/linux/bpf.h in fails to compile ("invalid
application of 'sizeof' to an incomplete type 'struct bpf_wq'": seen on Debian 12's 6.12
kernel, docs/kernels.md).  linux/tcp.h, net/sock.h, linux/skbuff.h and linux/filter.h all
drag it in.  The programs need none of them: their context structs are UAPI.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Kernel-internal headers that include include/linux/bpf.h (directly or through
# linux/skbuff.h -> ... -> linux/filter.h).
DRAG_IN_LINUX_BPF_H = {"linux/bpf.h", "linux/filter.h", "linux/skbuff.h", "linux/tcp.h",
                       "linux/ipv6.h", "linux/udp.h", "net/sock.h", "net/tcp.h",
                       "net/inet_sock.h", "net/request_sock.h", "linux/netdevice.h"}


def included(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M)


def test_no_bpf_source_includes_a_header_that_needs_struct_bpf_wq():
    sources = sorted((REPO / "bpf").glob("*.[ch]"))
    assert len(sources) >= 5, sources
    offending = {f"{p.name}: {h}" for p in sources for h in included(p)
                 if h in DRAG_IN_LINUX_BPF_H}
    assert not offending, offending


def test_the_include_check_sees_includes():
    # The check above must be able to fail: it parses the includes it guards.
    assert "uapi/linux/bpf.h" in included(REPO / "bpf" / "common.h")
    assert "maps.h" in included(REPO / "bpf" / "common.h")
