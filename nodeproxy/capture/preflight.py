"""Preflight: prove this node can run nodeproxy by trying each kernel feature it uses.

Every check really exercises the feature: eBPF programs are compiled by bcc and
loaded into the kernel (the verifier runs) but never attached; bpffs is mounted
on a scratch directory if /sys/fs/bpf is not one yet; the iptables capture rules
are installed in a scratch network namespace and a connection is redirected through
them; CNI plugins are executed.

An essential check is needed by one or both capture modes (``CheckResult.modes``):
the eBPF programs and what builds them by ebpf mode, iptables by iptables mode,
privileges and cgroup v2 by both.  `nodeproxy check` prints the results and the
capture modes this node supports; `nodeproxy run` refuses to start while a check
its configured mode needs fails:

    results = run_checks()
    supported_modes(results)             # ["ebpf", "iptables"] on a capable node
    require_essential(results, "ebpf")   # raises PreflightError listing the FAIL lines
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from nodeproxy.capture import iptables, kernelfs, libbpf, probe_snat
from nodeproxy.capture.libc import check, libc
from nodeproxy.capture.namespaces import netns_cookie_of
from nodeproxy.capture.original_dst import Destination, original_destination
from nodeproxy.config.model import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6
from nodeproxy.ports import OUTBOUND_PORT

MIN_KERNEL = (5, 15)
CAPTURE_MODES = ("ebpf", "iptables")

# Capability numbers from linux/capability.h.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
REQUIRED_CAPS = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": CAP_SYS_ADMIN}

# UAPI enum bpf_prog_type values missing from bcc 0.26's BPFProgType.
_PROG_TYPE_FALLBACK = {"SK_LOOKUP": 30, "CGROUP_SOCKOPT": 25}
_TCP_ULP = 31  # linux/tcp.h; not exported by Python's socket module
CNI_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")

BCC_HINT = (
    "apt install python3-bpfcc (bcc comes from Debian, PyPI's 'bcc' is unrelated) and use a "
    "venv made with /usr/bin/python3 -m venv --system-site-packages (make setup does both)"
)
HEADERS_HINT = (
    "install this kernel's headers (linux-headers-$(uname -r)); without them, `make setup` "
    "links Debian's linux-headers-amd64 into /lib/modules/$(uname -r)/build and .../source"
)
ROOT_HINT = (
    "run as root (sudo), or give the DaemonSet container securityContext.privileged: true "
    "or capabilities.add: [BPF, NET_ADMIN, SYS_ADMIN]"
)


IPTABLES_HINT = (
    "apt install iptables (iptables-nft and ip6tables), on a kernel with netfilter NAT and "
    "connection tracking for IPv4 and IPv6 (nf_nat, nf_conntrack, REDIRECT, REJECT, the "
    "conntrack match); or use capture.mode: ebpf"
)


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one preflight check; an `essential` one must pass for nodeproxy to run in
    each capture mode of `modes`."""

    name: str
    ok: bool
    detail: str
    hint: str
    essential: bool
    modes: tuple[str, ...] = CAPTURE_MODES


class PreflightError(RuntimeError):
    """Essential preflight checks failed; str() is their FAIL lines, one per line."""

    def __init__(self, failures: Sequence[CheckResult]):
        self.failures = list(failures)
        super().__init__("\n".join(format_result(r) for r in self.failures))


def modes_of(name: str) -> tuple[str, ...]:
    """The capture modes that need a check: iptables mode needs no eBPF program (sockops
    counters are a bonus it does without), ebpf mode no iptables."""
    if name == "iptables":
        return ("iptables",)
    if name in EBPF_ONLY or name in {f.name for f in _FEATURES}:
        return ("ebpf",)
    return CAPTURE_MODES


def _pass(name: str, detail: str, *, essential: bool = True) -> CheckResult:
    return CheckResult(name, True, detail, "", essential, modes_of(name))


def _fail(name: str, detail: str, hint: str, *, essential: bool = True) -> CheckResult:
    return CheckResult(name, False, detail, hint, essential, modes_of(name))


# ---------------------------------------------------------------- formatting

def format_result(r: CheckResult) -> str:
    """One line: `PASS  name  detail` or `FAIL  name  detail — fix: hint`."""
    if r.ok:
        return f"PASS  {r.name:<24}  {r.detail}"
    if not r.essential:
        needed = " (optional)"
    elif set(r.modes) != set(CAPTURE_MODES):
        needed = f" (needed by capture mode {', '.join(r.modes)})"
    else:
        needed = ""
    return f"FAIL  {r.name:<24}  {r.detail}{needed} — fix: {r.hint}"


def supported_modes(results: Sequence[CheckResult]) -> list[str]:
    """The capture modes every essential check of which passed."""
    return [m for m in CAPTURE_MODES if not essential_failures(results, m)]


def essential_failures(results: Sequence[CheckResult],
                       mode: str | None = None) -> list[CheckResult]:
    """The failed checks nodeproxy cannot run without in capture mode `mode`; with no mode,
    the failures that leave it no mode at all (none while some mode is supported)."""
    if mode is not None:
        return [r for r in results if r.essential and not r.ok and mode in r.modes]
    if supported_modes(results):
        return []
    return [r for r in results if r.essential and not r.ok]


def summary_line(results: Sequence[CheckResult]) -> str:
    """One line: how many checks passed, whether nodeproxy can run on this node, and in
    which capture modes."""
    failed = [r for r in results if not r.ok]
    essential = [r for r in failed if r.essential]
    supported = supported_modes(results)
    head = f"{len(results)} checks: {len(results) - len(failed)} passed, {len(failed)} failed"
    if not supported:
        return f"{head} ({len(essential)} essential) — nodeproxy cannot run on this node"
    if len(supported) < len(CAPTURE_MODES):
        lacking = "; ".join(
            f"{m} needs {', '.join(r.name for r in essential_failures(results, m))}"
            for m in CAPTURE_MODES if m not in supported)
        return (f"{head} ({len(essential)} essential) — nodeproxy can run on this node in "
                f"capture mode {', '.join(supported)} only ({lacking})")
    note = " (none essential)" if failed else ""
    return (f"{head}{note} — nodeproxy can run on this node "
            f"(capture modes: {', '.join(supported)})")


def report_lines(results: Sequence[CheckResult]) -> list[str]:
    """What `nodeproxy check` prints: one line per check, then the summary."""
    return [format_result(r) for r in results] + [summary_line(results)]


def to_json(results: Sequence[CheckResult]) -> str:
    """The results as a JSON list of objects with the CheckResult fields."""
    return json.dumps([asdict(r) for r in results], indent=2)


def require_essential(results: Sequence[CheckResult] | None = None,
                      mode: str | None = None) -> list[CheckResult]:
    """Run the checks (unless given) and raise PreflightError if one that capture mode
    `mode` needs failed (no mode: if no mode can run)."""
    results = list(results) if results is not None else run_checks()
    failures = essential_failures(results, mode)
    if failures:
        raise PreflightError(failures)
    return results


# ---------------------------------------------------------------- host checks

def read_effective_caps() -> int:
    """This process's effective capability mask (CapEff in /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> CheckResult:
    name = "privileges"
    try:
        caps = read_effective_caps()
    except OSError as e:
        return _fail(name, f"cannot read /proc/self/status: {e}", ROOT_HINT)
    missing = [cap for cap, bit in REQUIRED_CAPS.items() if not caps >> bit & 1]
    who = f"uid {os.geteuid()}"
    if missing:
        return _fail(name, f"{who}; effective capabilities lack {', '.join(missing)}", ROOT_HINT)
    return _pass(name, f"{who}; effective capabilities include {', '.join(REQUIRED_CAPS)}")


def check_kernel_version() -> CheckResult:
    name = "kernel-version"
    release = os.uname().release
    need = f">= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} needed for bpf_get_netns_cookie in sockops"
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return _fail(name, f"cannot parse kernel release {release!r} ({need})",
                     "run a kernel whose release starts with <major>.<minor>")
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_KERNEL:
        return _fail(name, f"{release} is too old ({need})",
                     f"upgrade the node kernel to {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer")
    return _pass(name, f"{release} ({need})")


def import_bcc() -> ModuleType:
    """Debian's bcc (raises ImportError if absent or if an unrelated 'bcc' shadows it)."""
    import bcc

    if not hasattr(bcc, "BPF"):
        raise ImportError(f"the 'bcc' module at {bcc.__file__} is not the BPF Compiler Collection")
    return bcc


def check_bcc() -> tuple[CheckResult, ModuleType | None]:
    name = "bcc"
    try:
        bcc = import_bcc()
    except Exception as e:  # noqa: BLE001 - any import failure means "no usable bcc"
        return _fail(name, f"cannot import bcc: {e} (python {sys.executable})", BCC_HINT), None
    version = getattr(bcc, "__version__", "unknown version")
    return _pass(name, f"bcc {version} from {os.path.dirname(bcc.__file__ or '?')}"), bcc


def check_bcc_findable() -> CheckResult:
    """bcc is there, found without importing it: `nodeproxy run` keeps bcc (and its LLVM)
    out of the daemon; the loading child imports it (and fails with its reason)."""
    import importlib.util

    name = "bcc"
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as e:
        spec, why = None, str(e)
    else:
        why = "No module named 'bcc'"
    if spec is None or spec.origin is None:
        return _fail(name, f"cannot import bcc: {why} (python {sys.executable})", BCC_HINT)
    return _pass(name, f"bcc at {os.path.dirname(spec.origin)} (imported by the loading child)")


def check_kernel_headers() -> CheckResult:
    name = "kernel-headers"
    release = os.uname().release
    build = f"/lib/modules/{release}/build"
    if not os.path.isdir(build):
        state = "is a dangling link" if os.path.islink(build) else "is missing"
        return _fail(name, f"{build} {state}; bcc compiles against it", HEADERS_HINT)
    target = os.path.realpath(build)
    if os.path.realpath(build) == os.path.abspath(build):
        return _pass(name, f"{build}")
    note = ""
    if release not in target:
        note = " (headers of another kernel: fine for the UAPI-only programs nodeproxy uses)"
    return _pass(name, f"{build} -> {target}{note}")


def check_btf() -> CheckResult:
    name = "btf"
    path = "/sys/kernel/btf/vmlinux"
    # bcc generates the BTF its maps need; kernel BTF is only for CO-RE/bpftool tooling.
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return _fail(name, f"{path}: {e.strerror}; bcc programs do not need it", (
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y gives bpftool readable map dumps"
        ), essential=False)
    return _pass(name, f"{path} ({size // 1024} KiB)", essential=False)


def check_cgroup2() -> CheckResult:
    name = "cgroup-v2"
    hint = ("mount the cgroup v2 hierarchy (mount -t cgroup2 none /sys/fs/cgroup/unified) or "
            "boot with systemd.unified_cgroup_hierarchy=1")
    try:
        mount = kernelfs.find_cgroup2_mount()
    except (OSError, kernelfs.KernelFsError) as e:
        return _fail(name, str(e), hint)
    if not os.access(os.path.join(mount, "cgroup.procs"), os.R_OK):
        return _fail(name, f"{mount} is mounted but its cgroup.procs is not readable", hint)
    pods = kernelfs.default_pod_cgroup(mount)
    pods_state = "present" if os.path.isdir(pods) else "not present yet"
    return _pass(name, f"mounted at {mount}; pod subtree {pods} {pods_state}")


def check_bpffs(path: str = kernelfs.DEFAULT_BPFFS) -> CheckResult:
    name = "bpffs"
    hint = (f"mount -t bpf bpf {path} (nodeproxy run does it when allowed); in a container, "
            f"mount the host's {path} into it")
    try:
        if kernelfs.is_bpffs(path):
            return _pass(name, f"mounted at {path}")
        scratch = tempfile.mkdtemp(prefix="nodeproxy-bpffs-check-")
        try:
            kernelfs.mount_bpffs(scratch)
            try:
                mounted = kernelfs.is_bpffs(scratch)
            finally:
                kernelfs.unmount(scratch)
        finally:
            os.rmdir(scratch)
    except (OSError, kernelfs.KernelFsError) as e:
        return _fail(name, f"not mounted at {path} and not mountable: {e}", hint)
    if not mounted:
        return _fail(name, f"not mounted at {path}; a test mount did not show up", hint)
    return _pass(name, f"not mounted at {path} yet, mountable (test mount succeeded)")


def check_jit() -> CheckResult:
    name = "bpf-jit"
    path = "/proc/sys/net/core/bpf_jit_enable"
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
    except OSError as e:
        return _fail(name, f"{path}: {e.strerror}", "use a kernel built with CONFIG_BPF_JIT=y")
    if value == "0":
        return _fail(name, f"{path} = 0 (programs would run interpreted)",
                     "sysctl -w net.core.bpf_jit_enable=1")
    return _pass(name, f"enabled ({path} = {value})")


# ---------------------------------------------------------------- eBPF feature checks

@contextlib.contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Collect what libbcc/LLVM/the verifier print on fd 2 instead of letting it through."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    lines: list[str] = []
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield lines
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                lines.extend(tmp.read().decode(errors="replace").splitlines())
    finally:
        os.close(saved)


def _why(exc: BaseException, output: Sequence[str]) -> str:
    """The most telling line of a bcc failure: a compiler error or the verifier's verdict."""
    text = [line.strip() for line in output if line.strip()]
    errors = [line for line in text if "error:" in line]
    if errors:
        return f"{exc}: {errors[0]}"
    verdict = [line for line in text
               if not line.startswith(("processed ", "verification time", "stack depth"))
               and not re.match(r"^\d+: ", line) and not line.startswith(";")]
    if verdict:
        return f"{exc}: {verdict[-1]}"
    return str(exc)


# BPF helpers the programs call that older kernels lack, and from which release on the
# program types that call them may (the verifier's "unknown func NAME#ID" otherwise).
_HELPER_SINCE = {
    "bpf_get_netns_cookie": "5.15 (sockops and sk_msg; cgroup/connect from 5.7)",
}


def _explain(why: str, hint: str, privileged: bool) -> tuple[str, str]:
    """(detail, hint) for a bcc failure, by what failed: compiler, map creation, a BPF
    helper the kernel does not offer, permission."""
    helper = re.search(r"unknown func (\w+)#\d+", why)
    if "could not open bpf map" in why:
        detail = f"map creation failed: {why}"
    elif helper:
        # The feature itself may be there (a sockhash on 5.10): name what is missing.
        name = helper.group(1)
        detail = f"the kernel does not offer the BPF helper {name} to this program: {why}"
        since = _HELPER_SINCE.get(name)
        hint = (f"{name} needs kernel >= {since}" if since
                else f"a kernel that offers {name} to this program type")
    elif re.search(r"\.[ch]:\d+:\d+: error:", why):
        detail = f"does not compile: {why}"
        hint = f"{hint}; if every bcc check fails to compile: {HEADERS_HINT}"
    else:
        detail = why
    if "Operation not permitted" in why or "Need super-user" in why:
        hint = ROOT_HINT
    elif not privileged:
        hint = f"fix the privileges check first; then: {hint}"
    return detail, hint


@dataclass(frozen=True)
class _Program:
    func: str
    prog_type: str      # bcc.BPFProgType attribute (UAPI fallback for ones bcc 0.26 lacks)
    attach_type: str    # bcc.BPFAttachType attribute, or "" for none


@dataclass(frozen=True)
class _Feature:
    name: str
    passed: str                     # detail on success
    hint: str
    programs: tuple[_Program, ...]
    maps: str = ""                  # map declarations
    decls: str = ""                 # helper pointers etc.: after *all* maps (bcc 0.26 quirk)
    code: str = ""
    essential: bool = True
    after_load: Callable[[Any, ModuleType], str] | None = field(default=None, compare=False)


_PRELUDE = f"""
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>
#define NPCHK_OUTBOUND_PORT {OUTBOUND_PORT}
"""

_KERNEL_HINT = "this kernel lacks it: use a kernel >= 5.15 built with CONFIG_BPF_SYSCALL=y"
_CGROUP_HINT = "use a kernel with CONFIG_CGROUP_BPF=y (>= 5.15)"
_SOCKMAP_HINT = "use a kernel with CONFIG_BPF_STREAM_PARSER=y / CONFIG_NET_SOCK_MSG=y (>= 5.15)"


def _try_kprobe(bpf: Any, bcc: ModuleType) -> str:
    """Loading a kprobe program works without kprobes; attaching one proves them."""
    symbols = ("tcp_v4_connect", "tcp_connect", "__sys_connect")
    for symbol in symbols:
        try:
            bpf.attach_kprobe(event=symbol.encode(), fn_name=b"npchk_kprobe")
        except Exception:  # noqa: BLE001, S112 - bcc raises bare Exception; try the next
            continue
        bpf.detach_kprobe(event=symbol.encode())
        return f"attached and detached a kprobe on {symbol}"
    # libbcc's own reason (printed on fd 2) is appended by _why().
    raise RuntimeError(f"no kprobe attaches to {', '.join(symbols)} "
                       "(kernel without CONFIG_KPROBES?)")


_MSG_PASSED = ("created a sockhash keyed by tuple and netns cookie, loaded sockops that fills "
               "it and an sk_msg verdict that redirects through it, attached the verdict to it")


def _attach_msg_verdict(bpf: Any, bcc: ModuleType) -> str:
    """Attach the loaded verdict to its sockhash (BPF_SK_MSG_VERDICT), as the daemon does,
    and detach it again; the map holds no socket, so nothing is redirected."""
    verdict = bpf.load_func(b"npchk_msg_redirect", bcc.BPFProgType.SK_MSG)
    sockhash = bcc.lib.bpf_table_fd(bpf.module, b"npchk_msg_hash")
    bcc.BPF.attach_func(verdict, sockhash, bcc.BPFAttachType.SK_MSG_VERDICT)
    bcc.BPF.detach_func(verdict, sockhash, bcc.BPFAttachType.SK_MSG_VERDICT)
    return _MSG_PASSED


_SPLICE_PASSED = ("loaded an sk_skb stream parser and a verdict that splices through a "
                  "sockhash; hash map batch update and delete (a flow's splice set-up)")


def _try_map_batches(bpf: Any, bcc: ModuleType) -> str:
    """Write two elements of a hash map in one batch and delete them in one, as the splice
    does per flow (capture/splice.py; Linux 5.6)."""
    fd = bcc.lib.bpf_table_fd(bpf.module, b"npchk_batch")
    keys = (ctypes.c_uint64 * 2)(1, 2)
    values = (ctypes.c_uint64 * 2)(3, 4)
    code, done = libbpf.map_update_batch(fd, ctypes.byref(keys), ctypes.byref(values), 2)
    if code:
        raise OSError(code, f"hash map batch update: {os.strerror(code)}")
    code, done = libbpf.map_delete_batch(fd, ctypes.byref(keys), 2)
    if code or done != 2:
        raise OSError(code, f"hash map batch delete ({done} of 2): {os.strerror(code)}")
    return _SPLICE_PASSED


_FEATURES: tuple[_Feature, ...] = (
    _Feature(
        "cgroup/connect4", "loaded a cgroup/connect4 program that rewrites the destination",
        _CGROUP_HINT,
        (_Program("npchk_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),),
        code="""
int npchk_connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */)
        return 1;
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(NPCHK_OUTBOUND_PORT);
    return 1;
}
""",
    ),
    _Feature(
        "cgroup/connect6", "loaded a cgroup/connect6 program that rewrites the destination",
        _CGROUP_HINT,
        (_Program("npchk_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),),
        code="""
int npchk_connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */)
        return 1;
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = bpf_htons(NPCHK_OUTBOUND_PORT);
    return 1;
}
""",
    ),
    _Feature(
        "sockops", "loaded a sockops program that asks for state and RTT callbacks",
        _CGROUP_HINT,
        (_Program("npchk_sockops", "SOCK_OPS", ""),),
        code="""
int npchk_sockops(struct bpf_sock_ops *skops) {
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        bpf_sock_ops_cb_flags_set(skops,
            BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG);
    return 1;
}
""",
    ),
    _Feature(
        "sockhash+sk_msg", _MSG_PASSED, _SOCKMAP_HINT,
        (_Program("npchk_sockhash_add", "SOCK_OPS", ""),
         _Program("npchk_msg_redirect", "SK_MSG", "")),
        # As bpf/redirect.c: the verdict needs bpf_get_netns_cookie and map lookups in
        # sk_msg, the sockhash a struct key filled at ACTIVE_ESTABLISHED.
        maps="""
struct npchk_msg_key { u64 netns; u32 ports[2]; };
BPF_SOCKHASH(npchk_msg_hash, struct npchk_msg_key, 8);
BPF_TABLE("lru_hash", struct npchk_msg_key, u64, npchk_msg_flows, 8);
""",
        decls="static u64 (*npchk_msg_netns_cookie)(void *ctx) = "
              "(void *)BPF_FUNC_get_netns_cookie;",
        code="""
int npchk_sockhash_add(struct bpf_sock_ops *skops) {
    struct npchk_msg_key key = {};
    key.netns = npchk_msg_netns_cookie(skops);
    key.ports[0] = skops->local_port;
    key.ports[1] = bpf_ntohl(skops->remote_port);
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        long err = npchk_msg_hash.sock_hash_update(skops, &key, BPF_ANY);
    }
    return 1;
}
int npchk_msg_redirect(struct sk_msg_md *msg) {
    struct npchk_msg_key key = {};
    key.netns = npchk_msg_netns_cookie(msg);
    key.ports[0] = bpf_ntohl(msg->remote_port);
    key.ports[1] = msg->local_port;
    if (!npchk_msg_flows.lookup(&key))
        return SK_PASS;
    long verdict = npchk_msg_hash.msg_redirect_hash(msg, &key, BPF_F_INGRESS);
    return SK_PASS;
}
""",
        after_load=_attach_msg_verdict,
    ),
    _Feature(
        "sk_skb-stream-verdict",
        _SPLICE_PASSED,
        _SOCKMAP_HINT + "; hash map batches need >= 5.6",
        (_Program("npchk_skb_parser", "SK_SKB", ""),
         _Program("npchk_skb_verdict", "SK_SKB", "")),
        maps="BPF_SOCKHASH(npchk_skb_hash, u64, 8);\nBPF_HASH(npchk_batch, u64, u64, 4);",
        code="""
int npchk_skb_parser(struct __sk_buff *skb) {
    return skb->len;
}
int npchk_skb_verdict(struct __sk_buff *skb) {
    u64 key = skb->local_port;
    return npchk_skb_hash.sk_redirect_hash(skb, &key, 0);
}
""",
        after_load=_try_map_batches,
    ),
    _Feature(
        "sk_lookup", "loaded an sk_lookup program", "use a kernel >= 5.9 with CONFIG_NET",
        (_Program("npchk_sk_lookup", "SK_LOOKUP", "SK_LOOKUP"),),
        code="""
int npchk_sk_lookup(struct bpf_sk_lookup *ctx) {
    if (ctx->protocol != IPPROTO_TCP || ctx->local_port == 0)
        return SK_PASS;
    return SK_PASS;
}
""",
    ),
    _Feature(
        "cgroup/getsockopt", "loaded a cgroup/getsockopt program that answers SO_ORIGINAL_DST",
        _CGROUP_HINT,
        (_Program("npchk_getsockopt", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT"),),
        # The barrier keeps clang from merging the optlen/retval stores into one 8-byte
        # store, which the verifier rejects ("invalid bpf_context access off=32 size=8").
        code="""
int npchk_getsockopt(struct bpf_sockopt *ctx) {
    if (ctx->level != SOL_IP || ctx->optname != 80 /* SO_ORIGINAL_DST */)
        return 1;
    __u8 *optval = ctx->optval;
    if (optval + 16 > (__u8 *)ctx->optval_end)
        return 1;
    __builtin_memset(optval, 0, 16);
    ctx->optlen = 16;
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}
""",
    ),
    _Feature(
        "netns-cookie-in-sockops", "loaded a sockops program calling bpf_get_netns_cookie",
        "bpf_get_netns_cookie in sockops needs kernel >= 5.15",
        (_Program("npchk_netns_cookie", "SOCK_OPS", ""),),
        decls="static u64 (*npchk_get_netns_cookie)(void *ctx) = "
              "(void *)BPF_FUNC_get_netns_cookie;",
        code="""
int npchk_netns_cookie(struct bpf_sock_ops *skops) {
    return npchk_get_netns_cookie(skops) != 0;
}
""",
    ),
    _Feature(
        "sk-storage", "created socket-local storage and loaded sockops that uses it",
        "socket-local storage (BPF_MAP_TYPE_SK_STORAGE) needs kernel >= 5.2 with BTF support",
        (_Program("npchk_sk_storage", "SOCK_OPS", ""),),
        maps="BPF_SK_STORAGE(npchk_sk_store, u64);",
        code="""
int npchk_sk_storage(struct bpf_sock_ops *skops) {
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    u64 *v = npchk_sk_store.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (v)
        *v += 1;
    return 1;
}
""",
    ),
    _Feature(
        "kprobes", "", "informational: nodeproxy does not use kprobes",
        (_Program("npchk_kprobe", "KPROBE", ""),),
        code="int npchk_kprobe(void *ctx) { return 0; }\n",
        essential=False, after_load=_try_kprobe,
    ),
)


def _source(features: Sequence[_Feature]) -> str:
    return "\n".join([
        _PRELUDE,
        *(f.maps for f in features),
        *(f.decls for f in features),
        *(f.code for f in features),
    ])


def _load_feature(bpf: Any, bcc: ModuleType, feature: _Feature,
                  privileged: bool) -> CheckResult:
    with _fd2_captured() as output:
        try:
            for p in feature.programs:
                prog_type = getattr(bcc.BPFProgType, p.prog_type, None)
                if prog_type is None:
                    prog_type = _PROG_TYPE_FALLBACK[p.prog_type]
                attach_type = getattr(bcc.BPFAttachType, p.attach_type) if p.attach_type else -1
                bpf.load_func(p.func.encode(), prog_type, attach_type=attach_type)
            detail = feature.after_load(bpf, bcc) if feature.after_load else feature.passed
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            error: BaseException | None = e
        else:
            error = None
    if error is not None:
        detail, hint = _explain(_why(error, output), feature.hint, privileged)
        return _fail(feature.name, detail, hint, essential=feature.essential)
    return _pass(feature.name, detail, essential=feature.essential)


def _compile(bcc: ModuleType, text: str) -> tuple[Any, str]:
    with _fd2_captured() as output:
        try:
            bpf = bcc.BPF(text=text.encode())
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            error: BaseException | None = e
        else:
            error = None
    if error is not None:
        return None, _why(error, output)
    return bpf, ""


def check_bpf_features(bcc: ModuleType | None, privileged: bool = True) -> list[CheckResult]:
    """Load one tiny program per kernel feature; compile once, per feature only on failure.

    `privileged` is whether the privileges check passed; failures then point at it first.
    """
    if bcc is None:
        return [_fail(f.name, "not tried: bcc is not importable", BCC_HINT,
                      essential=f.essential) for f in _FEATURES]
    bpf, _ = _compile(bcc, _source(_FEATURES))
    if bpf is not None:
        try:
            return [_load_feature(bpf, bcc, f, privileged) for f in _FEATURES]
        finally:
            bpf.cleanup()
    # Something in the combined source failed: compile each feature alone to say which.
    results = []
    for f in _FEATURES:
        one, why = _compile(bcc, _source([f]))
        if one is None:
            detail, hint = _explain(why, f.hint, privileged)
            results.append(_fail(f.name, detail, hint, essential=f.essential))
            continue
        try:
            results.append(_load_feature(one, bcc, f, privileged))
        finally:
            one.cleanup()
    return results


def check_capture_program(bcc: ModuleType | None, outbound_port: int = OUTBOUND_PORT,
                          privileged: bool = True) -> CheckResult:
    """Compile bpf/*.c exactly as the daemon does, load every program (never attach) and
    check the maps against the daemon's view of them (capture/contract.py)."""
    name = "capture-program"
    hint = "bpf/*.c must compile against this kernel's headers and pass the verifier"
    if bcc is None:
        return _fail(name, "not tried: bcc is not importable", BCC_HINT)
    try:
        from nodeproxy.capture import bpf_build, contract

        src = bpf_build.bpf_source_dir()
    except Exception as e:  # noqa: BLE001 - report any failure to locate the sources
        return _fail(name, f"cannot locate the eBPF sources: {e}",
                     "set NODEPROXY_BPF_DIR to the directory holding capture.c and inbound.c")
    bpf = None
    scratch = f"{kernelfs.DEFAULT_BPFFS}/nodeproxy-preflight-{os.getpid()}"
    with _fd2_captured() as output:
        try:
            bpf = bpf_build.compile_programs(bcc, scratch, outbound_port=outbound_port)
            for spec in bpf_build.ALL_PROGRAMS:
                bpf_build.load_program(bpf, spec)
            contract.check_compiled(bpf)  # as the daemon's load() does
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            error: BaseException | None = e
        else:
            error = None
        finally:
            if bpf is not None:
                bpf.cleanup()
            shutil.rmtree(scratch, ignore_errors=True)
    if error is not None:
        detail, hint = _explain(_why(error, output), hint, privileged)
        return _fail(name, f"{src}: {detail}", hint)
    loaded = ", ".join(spec.function for spec in bpf_build.ALL_PROGRAMS)
    return _pass(name, f"{src} compiled; {loaded} loaded; maps as capture/contract.py")


# ---------------------------------------------------------------- iptables capture

_CLONE_NEWNET = 0x40000000
TEST_NET = {socket.AF_INET: ("192.0.2.0/24", "192.0.2.1", "127.0.0.1"),
            socket.AF_INET6: ("2001:db8::/32", "2001:db8::1", "::1")}


def _in_scratch_netns(fn: Callable[[int], None], timeout: float = 60.0) -> None:
    """Run fn(netns fd) on a thread of its own in a new, empty network namespace, which
    goes away with the thread (nothing else ever enters it)."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            check(libc().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                fn(fd)
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)

    thread = threading.Thread(target=body, name="nodeproxy-preflight-netns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"the scratch netns test took more than {timeout:.0f}s")
    if failure:
        raise failure[0]


def _redirect_and_deny(netns_fd: int) -> None:
    """In the scratch netns: the capture rules redirect a connection to a test address to
    the outbound port, SO_ORIGINAL_DST names the test address, and a deny is refused."""
    for argv in (["ip", "link", "set", "lo", "up"],
                 *(["ip", "-6" if family == socket.AF_INET6 else "-4", "route", "add", net,
                    "dev", "lo"] for family, (net, _, _) in TEST_NET.items())):
        subprocess.run(argv, check=True, capture_output=True, timeout=10)
    ports = iptables.Ports()
    denies = [iptables.DenyRule(ipaddress.ip_address(target), 9, "preflight")
              for _, target, _ in TEST_NET.values()]
    iptables.install(netns_fd, "scratch netns", ports, denies=denies)
    for family, (_, target, loopback) in TEST_NET.items():
        version = "IPv4" if family == socket.AF_INET else "IPv6"
        with socket.socket(family) as listener, socket.socket(family) as client:
            listener.bind((loopback, ports.outbound))
            listener.listen(1)
            listener.settimeout(5)
            client.settimeout(5)
            client.connect((target, 80))
            conn, _ = listener.accept()
            with conn:
                found = original_destination(conn)
            if found != Destination(ipaddress.ip_address(target), 80):
                raise RuntimeError(f"{version}: a connection to {target}:80 was redirected but "
                                   f"SO_ORIGINAL_DST says {found}")
        with socket.socket(family) as denied:
            denied.settimeout(5)
            try:
                denied.connect((target, 9))
            except ConnectionRefusedError:
                continue
            raise RuntimeError(f"{version}: a REJECT rule did not refuse {target}:9")
    # inbound.probeSnat's chain (in the node's nat table): the owner match and SNAT.
    rules = probe_snat.ProbeSnatRules(
        PROBE_SNAT_IPV4, PROBE_SNAT_IPV6,
        frozenset(ipaddress.ip_address(target) for _, target, _ in TEST_NET.values()))
    probe_snat.install(rules)
    for family in iptables.FAMILIES:
        wanted = [line.split(" ", 2)[2] for line in probe_snat.snat_rules(family, rules)]
        if probe_snat.installed(family) != wanted:
            raise RuntimeError(f"{family.name}: the probe SNAT chain reads back as "
                               f"{probe_snat.installed(family)}, not {wanted}")


def check_iptables() -> CheckResult:
    """iptables capture: the tools exist and their rules work, tried in a scratch netns."""
    name = "iptables"
    missing = iptables.missing_binaries()
    if missing:
        return _fail(name, f"{', '.join(missing)} not found on PATH", IPTABLES_HINT)
    try:
        version = subprocess.run(["iptables", "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip() or "iptables"
        _in_scratch_netns(_redirect_and_deny)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and \
            e.stderr else str(e)
        hint = IPTABLES_HINT
        if not check_privileges().ok:
            hint = f"fix the privileges check first; then: {IPTABLES_HINT}"
        return _fail(name, f"nat REDIRECT capture does not work here: {detail}", hint)
    return _pass(name, f"{version}: REDIRECT to the outbound port, SO_ORIGINAL_DST, a "
                       "REJECT deny and inbound.probeSnat's SNAT rules work for IPv4 and "
                       "IPv6 (tried in a scratch netns)")


def check_netns_cookie_sockopt() -> CheckResult:
    """getsockopt(SO_NETNS_COOKIE): enrolling a pod reads its netns cookie this way (its
    key in the kernel maps).  ebpf mode needs it; iptables mode on a kernel without it
    keys pods by their netns inode and runs without kernel counters (Netns.pod_key)."""
    name = "netns-cookie-sockopt"
    try:
        with socket.socket() as probe:
            cookie = netns_cookie_of(probe)
    except OSError as e:
        return _fail(name, f"getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) failed: {e.strerror}; "
                     "ebpf mode cannot enroll pods",
                     "SO_NETNS_COOKIE needs kernel >= 5.14; iptables mode runs without it "
                     "(pods keyed by netns inode, no kernel counters)")
    return _pass(name, f"getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) answers ({cookie}): "
                 "pods can be enrolled")


# ---------------------------------------------------------------- optional extras

def check_kernel_tls() -> CheckResult:
    """Kernel TLS (TCP_ULP "tls") on a real loopback connection; informational."""
    name = "kernel-tls"
    hint = "informational: nodeproxy terminates TLS in user space and does not need kTLS"
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=2) as client:
                peer, _ = listener.accept()
                with peer:
                    client.setsockopt(socket.IPPROTO_TCP, _TCP_ULP, b"tls")
    except OSError as e:
        why = "kernel built without CONFIG_TLS" if e.errno == errno.ENOENT else e.strerror
        return _fail(name, f"setsockopt(TCP_ULP, \"tls\") failed: {why}", hint, essential=False)
    return _pass(name, "TCP_ULP \"tls\" accepted on a loopback connection", essential=False)


def check_cni_plugins() -> CheckResult:
    """The CNI plugins the test topology and demo wire pods with; run each one's VERSION."""
    name = "cni-plugins"
    hint = "apt install containernetworking-plugins (make setup does it); only demo/tests need it"
    found: dict[str, str] = {}
    for plugin in CNI_PLUGINS:
        for directory in CNI_DIRS:
            path = os.path.join(directory, plugin)
            if os.access(path, os.X_OK):
                found[plugin] = path
                break
    missing = [p for p in CNI_PLUGINS if p not in found]
    if missing:
        return _fail(name, f"{', '.join(missing)} not found in {' or '.join(CNI_DIRS)}", hint,
                     essential=False)
    versions: set[str] = set()
    for path in found.values():
        env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            proc = subprocess.run([path], env=env, input=b"", capture_output=True, timeout=5,
                                  check=False)
            versions.update(json.loads(proc.stdout)["supportedVersions"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as e:
            return _fail(name, f"{path} does not answer CNI VERSION: {e}", hint, essential=False)
    dirs = sorted({os.path.dirname(p) for p in found.values()})
    newest = max(versions, key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)))
    return _pass(name, f"{', '.join(CNI_PLUGINS)} in {', '.join(dirs)} (CNI up to {newest})",
                 essential=False)


# ---------------------------------------------------------------- all together

def run_checks(outbound_port: int = OUTBOUND_PORT) -> list[CheckResult]:
    """Every check, in a stable order; the bcc ones compile at most twice in total."""
    bcc_result, bcc = check_bcc()
    privileges = check_privileges()
    results = [
        privileges,
        check_kernel_version(),
        check_netns_cookie_sockopt(),
        bcc_result,
        check_kernel_headers(),
        check_btf(),
        check_cgroup2(),
        check_bpffs(),
        check_jit(),
    ]
    features = check_bpf_features(bcc, privileges.ok)
    essential_features = [r for r in features if r.essential]
    optional_features = [r for r in features if not r.essential]
    results += essential_features
    results.append(check_capture_program(bcc, outbound_port, privileges.ok))
    results.append(check_iptables())
    results += optional_features
    results.append(check_kernel_tls())
    results.append(check_cni_plugins())
    return results


def check_names() -> list[str]:
    """Names of the checks run_checks() reports, in order (without running them)."""
    return ["privileges", "kernel-version", "netns-cookie-sockopt", "bcc", "kernel-headers",
            "btf", "cgroup-v2", "bpffs", "bpf-jit", *(f.name for f in _FEATURES if f.essential),
            "capture-program",
            "iptables", *(f.name for f in _FEATURES if not f.essential), "kernel-tls",
            "cni-plugins"]


# Checks only ebpf mode needs (besides the eBPF feature checks): what builds and loads its
# programs.  iptables mode loads sockops where it can and does without kernel counters
# otherwise.
EBPF_ONLY = frozenset({"kernel-version", "netns-cookie-sockopt", "bcc", "kernel-headers",
                       "bpffs", "bpf-jit", "capture-program"})


__all__ = [
    "CAPTURE_MODES", "CheckResult", "PreflightError", "check_iptables", "check_names",
    "essential_failures", "format_result", "read_effective_caps", "report_lines",
    "require_essential", "run_checks", "summary_line", "supported_modes", "to_json",
]
