"""The hot paths' compiled form (the L7 request path and the HBONE tunnel): which modules
have one, and whether this process imports it.

`pip install` compiles the modules in NATIVE_MODULES with mypyc when it can (setup.py;
Debian's gcc and python3-dev, which scripts/setup.sh installs) and records the SHA-256
of each one's source in ``_native_build.json`` beside them.  The sources stay in the
package and stay what runs when:

- there is no build (no compiler at install time: the build is optional),
- ``NODEPROXY_NATIVE=0`` is set (the pure-Python path, for tests and for comparing),
- the build does not match the sources (any source edited since, a module missing, or
  another interpreter's build): the compiled form is refused, all of it.

The choice is all or nothing because mypyc compiles the modules as one group: a compiled
module calls the others' classes and functions directly, so a mix of compiled and
interpreted modules of one group cannot run.  `install()` (run by nodeproxy/__init__.py,
before any of these modules is imported) enforces the choice with a finder that serves
the sources; `state()` says what was chosen and why (the daemon logs it).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The per-request path of HTTP/1.1 (docs/benchmarks.md, "mypyc on the L7 path"):
# compiled together, one group.
NATIVE_MODULES: tuple[str, ...] = (
    "nodeproxy.codec.h1",
    "nodeproxy.codec.message",
    "nodeproxy.codec.header_fields",
    "nodeproxy.codec.request_target",
    "nodeproxy.http.access_log",
    "nodeproxy.http.attempts",
    "nodeproxy.http.authorize",
    "nodeproxy.http.balancer",
    "nodeproxy.http.circuit_breaker",
    "nodeproxy.http.clusters",
    "nodeproxy.http.context",
    "nodeproxy.http.deadlines",
    "nodeproxy.http.fault",
    "nodeproxy.http.handler",
    "nodeproxy.http.local_reply",
    "nodeproxy.http.outlier",
    "nodeproxy.http.pool",
    "nodeproxy.http.rate_limit",
    "nodeproxy.http.recorder",
    "nodeproxy.http.resilience",
    "nodeproxy.http.retry",
    "nodeproxy.http.router",
    "nodeproxy.http.routes",
    "nodeproxy.telemetry.labels",
    "nodeproxy.telemetry.live_stats",
    # The relayed bytes' meter: ConnectionMeter.bytes on every relayed read of both paths
    # (docs/benchmarks.md, "A quiet message's path, second round").
    "nodeproxy.telemetry.proxy_metrics",
    "nodeproxy.telemetry.request_metrics",
    "nodeproxy.telemetry.trace_start",
    "nodeproxy.tcp.token_bucket",
    "nodeproxy.owned_cache",
    # Each source's fair share: begin_request/end_request on every request (interpreted,
    # they were five Python calls per request; "L7 per-request cost, twelfth round").
    "nodeproxy.tcp.fairshare",
    # The HTTP/2 codec joined to h2 (docs/benchmarks.md, "HTTP/2 compiled, third round"):
    # its per-stream code (the exchanges, the request head, the response fields,
    # flushing).  H2Server and H2Client are native classes here (asyncio.Protocol's base
    # notwithstanding), and a native class refuses to construct an interpreted subclass:
    # their subclasses must be in the group too (http/client_h2.py's ClientH2Server,
    # pool.py's _CountedH2; tests/unit/test_native.py checks every such subclass).
    # h2_connection.py, which subclasses h2's classes, stays Python.
    "nodeproxy.codec.h2",
    "nodeproxy.http.client_h2",
    # The server side's frame budgets, told of every received frame (both paths).
    "nodeproxy.codec.h2_guard",
    # The cross-node path (HBONE): the tunnel's frames and the TLS records under them
    # (docs/benchmarks.md, "mypyc on the HBONE path").
    "nodeproxy.codec.h2_frames",
    "nodeproxy.identity.tls_transport",
    "nodeproxy.tunnel.header_block",
    "nodeproxy.tunnel.response_deadlines",
    "nodeproxy.tunnel.session",
    # The byte relay both paths' relayed flows run through: its sides' reads and
    # `Relay.forward` (docs/benchmarks.md, "The byte relay compiled").
    "nodeproxy.tcp.relay",
)
# Not compiled: a connection's set-up (the listeners, mesh/upstream.py, tunnel/client.py,
# tcp/dial.py, capture/original_dst.py).  They compile (mesh/upstream.py's
# Refused would then need @mypyc_attr(native_class=False), as router.py rebinds
# `except ... as e`), but compiled they took no measurable CPU off a connection on either
# path (same node, two of three profile pairs spent more): they are glue over interpreted
# objects (sockets, transports, pods, metrics), whose attributes CPython 3.11's
# specializing interpreter reads through inline caches and mypyc's build reads
# generically (docs/benchmarks.md, "Connection set-up, eleventh round").
GROUP = "nodeproxy._native"  # mypyc's shared library: nodeproxy/_native__mypyc*.so
MANIFEST = "_native_build.json"
NO_BUILD = "pure Python: no compiled build"
ENV = "NODEPROXY_NATIVE"
PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, root: Path = PACKAGE_DIR.parent) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(modules: Sequence[str], root: Path) -> dict[str, object]:
    """What a build records (setup.py writes it): the interpreter it is for and each
    compiled module's source hash."""
    return {"cache_tag": sys.implementation.cache_tag,
            "modules": {m: source_hash(source_path(m, root)) for m in modules}}


def _compiled_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.exists():
            return candidate
    return None


def judge(root: Path = PACKAGE_DIR.parent,
          environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[bool, str]:
    """(use the compiled form?, why) for the package under `root`."""
    built = [m for m in NATIVE_MODULES if _compiled_file(m, root) is not None]
    if not built:
        return False, NO_BUILD
    if environ.get(ENV, "") == "0":
        return False, f"pure Python: {ENV}=0"
    try:
        recorded = json.loads((root / "nodeproxy" / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return False, f"pure Python: compiled modules without a readable {MANIFEST} ({e})"
    if recorded.get("cache_tag") != sys.implementation.cache_tag:
        return False, (f"pure Python: the build is for {recorded.get('cache_tag')}, "
                       f"this is {sys.implementation.cache_tag}")
    hashes = recorded.get("modules", {})
    missing = [m for m in NATIVE_MODULES if m not in hashes or m not in built]
    if missing:
        return False, f"pure Python: the build lacks {', '.join(missing)}"
    stale = [m for m in NATIVE_MODULES if hashes[m] != source_hash(source_path(m, root))]
    if stale:
        return False, f"pure Python: the build is older than the source of {', '.join(stale)}"
    return True, f"compiled (mypyc): {len(NATIVE_MODULES)} modules"


class _Sources(importlib.abc.MetaPathFinder):
    """Serves NATIVE_MODULES from their .py files, ahead of the compiled forms."""

    def __init__(self, root: Path):
        self._root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NATIVE_MODULES:
            return None
        return importlib.util.spec_from_file_location(
            fullname, source_path(fullname, self._root))


_state: tuple[bool, str] | None = None


def install() -> None:
    """Decide once per process, and keep the compiled forms out when the answer is no."""
    global _state
    if _state is not None:
        return
    _state = judge()
    if not _state[0] and any(m in sys.modules for m in NATIVE_MODULES):
        raise ImportError("nodeproxy.native.install() ran after a compiled module was loaded")
    if not _state[0] and _state[1] != NO_BUILD:  # a build is there, and refused
        sys.meta_path.insert(0, _Sources(PACKAGE_DIR.parent))


def state() -> tuple[bool, str]:
    """(compiled?, the reason), as install() decided it."""
    install()
    assert _state is not None
    return _state


def loaded_compiled() -> list[str]:
    """The NATIVE_MODULES imported so far from a compiled file (for checks and logs)."""
    return [name for name in NATIVE_MODULES
            if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")
                                                   ).endswith(".py")]
