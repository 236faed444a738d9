"""The package's import graph keeps its layers, and each name means one thing: read from
the source (no imports run).  The order and why it is so: docs/architecture.md, "Layers"."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nodeproxy

RUNTIME = Path(nodeproxy.__file__).parent

# Lowest first.  A module may import its own package and packages of a strictly lower
# tier, nothing else: never a package of its own tier, never one above.  "" is the
# package root (nodeproxy/__init__.py: the version); a top-level module (ports.py) is
# a package of its own.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("native",),                             # which modules run compiled (the root asks)
    ("", "ports", "stream_protocol", "log_limit"),  # the default ports (the root: the
                                             # version); what a stream's protocol has
                                             # (asyncio's set); warnings a peer causes
    ("config",),                             # what the node is told
    ("identity", "discovery", "capture"),    # who it is, what the cluster says, the kernel
    ("tcp", "signer"),                       # one TCP connection's machinery; the
                                             # signing service and its node client
    ("codec",),                              # HTTP on the wire
    ("policy", "tunnel", "telemetry"),       # admission, HBONE, series and traces
    ("mesh",),                               # the mesh snapshot; where a connection goes
    ("http",),                               # the L7 proxy
    ("listeners",),                          # 15001, 15008, 15006
    ("pods",),                               # enrollment: listeners, then steering
    ("admin",),                              # the daemon's HTTP faces, the control client
    ("cni", "daemon"),                       # the CNI plugin; wiring and lifecycle
    ("cli",),                                # the commands
    ("__main__",),
)
TIER = {package: tier for tier, packages in enumerate(LAYERS) for package in packages}

# Names two modules or two classes of the runtime package may share, each with the
# reason; empty: every module basename and every class name in nodeproxy/ is unique.
SHARED_BASENAMES: dict[str, str] = {}
SHARED_CLASS_NAMES: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    path: Path   # the importing file
    line: int
    module: str  # absolute name of what it imports (a module, or a name in one)

    def __str__(self) -> str:
        return f"{shown(self.path)}:{self.line} imports {self.module}"


def shown(path: Path) -> str:
    """The path from the directory that holds the package (nodeproxy/codec/h1.py)."""
    root = next(p for p in path.parents if p.name == "nodeproxy").parent
    return str(path.relative_to(root))


def module_name(path: Path) -> str:
    parts = Path(shown(path)).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[Import]:
    """Every import statement of a file, wherever it is (module level, inside a function,
    under ``if TYPE_CHECKING:``), relative imports resolved.  ``from a import b`` yields
    ``a.b``: b may be a module."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                yield Import(path, node.lineno, f"{module}.{alias.name}")


def package_of(module: str) -> str | None:
    """The layer key of a module of the runtime package, None outside it."""
    parts = module.split(".")
    if parts[0] != "nodeproxy":
        return None
    return parts[1] if len(parts) > 1 else ""


def runtime_files(package: Path = RUNTIME) -> list[Path]:
    return sorted(package.rglob("*.py"))


def test_the_runtime_package_never_imports_the_development_tooling():
    """The image carries nodeproxy/ alone: an import of nodeproxy_dev there would break
    the installed daemon (the CLI finds the dev subcommands by name, not by import)."""
    offenders = [str(i) for path in runtime_files() for i in imports(path)
                 if i.module.split(".")[0] == "nodeproxy_dev"]
    assert offenders == []


def test_every_package_has_its_place_in_the_layers():
    packages = {package_of(module_name(path)) for path in runtime_files()}
    unplaced = sorted(p for p in packages if p not in TIER)
    assert unplaced == [], (
        f"packages of nodeproxy/ not in LAYERS: {unplaced}; place each in the tier of "
        "tests/unit/test_layers.py that its imports allow, and say so in docs/architecture.md")


def upward_imports(files: list[Path]) -> list[str]:
    offenders = []
    for path in files:
        source = package_of(module_name(path))
        for i in imports(path):
            target = package_of(i.module)
            if target is None or target == source or source not in TIER or target not in TIER:
                continue
            if TIER[target] >= TIER[source]:
                offenders.append(f"{i} (tier {TIER[target]} {target or 'nodeproxy'!r}, from "
                                 f"tier {TIER[source]} {source!r})")
    return offenders


def test_no_package_imports_its_own_tier_or_above():
    assert upward_imports(runtime_files()) == []


def test_an_upward_import_is_named_by_file_line_and_module(tmp_path: Path):
    """The check itself: lazy, type-only and relative imports count, and the message
    names the offending file, line and import."""
    package = tmp_path / "nodeproxy"
    (package / "codec").mkdir(parents=True)
    (package / "codec" / "__init__.py").write_text("")
    (package / "codec" / "wire.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from nodeproxy.config.model import NodeConfig\n"       # down: fine
        "from . import h1\n"                                     # own package: fine
        "if TYPE_CHECKING:\n"
        "    from nodeproxy.http.manager import HttpProxy\n"     # up, type only
        "def serve():\n"
        "    from ..listeners import outbound\n"                 # up, lazy, relative
        "    import nodeproxy.tcp.relay\n"               # down: fine
        "    from nodeproxy.codec.h2 import H2Server\n"          # own package: fine
        "    from nodeproxy.tunnel.session import H2Session\n")  # up a tier
    assert upward_imports(runtime_files(package)) == [
        "nodeproxy/codec/wire.py:5 imports nodeproxy.http.manager.HttpProxy "
        "(tier 8 'http', from tier 5 'codec')",
        "nodeproxy/codec/wire.py:7 imports nodeproxy.listeners.outbound "
        "(tier 9 'listeners', from tier 5 'codec')",
        "nodeproxy/codec/wire.py:10 imports nodeproxy.tunnel.session.H2Session "
        "(tier 6 'tunnel', from tier 5 'codec')",
    ]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in runtime_files():
        source = package_of(module_name(path))
        assert source is not None
        for i in imports(path):
            target = package_of(i.module)
            if target is not None and target != source:
                graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_packages():
    graph = package_graph()
    found = cycles(graph)
    witnesses = []
    for component in found:
        members = set(component)
        witnesses += [str(i) for path in runtime_files()
                      if package_of(module_name(path)) in members
                      for i in imports(path)
                      if package_of(i.module) in members - {package_of(module_name(path))}]
    assert found == [], "\n".join(witnesses)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_share_a_basename():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in runtime_files():
        if path.name not in ("__init__.py", "__main__.py"):
            by_name[path.name].append(shown(path))
    shared = {name: paths for name, paths in by_name.items()
              if len(paths) > 1 and name not in SHARED_BASENAMES}
    assert shared == {}


def test_the_development_tree_names_no_module_like_a_runtime_one():
    """`nodeproxy_dev/bench/enrollment.py` beside `nodeproxy/pods/enrollment.py` would read
    as the same idea: a tool's module says what it measures or builds."""
    runtime = {path.name for path in runtime_files()} - {"__init__.py", "__main__.py"}
    dev = RUNTIME.parent / "nodeproxy_dev"
    clashes = [str(path.relative_to(dev.parent)) for path in runtime_files(dev)
               if path.name in runtime]
    assert clashes == []


def test_no_module_is_named_like_a_package():
    """`signer/policy.py` beside the `policy/` package would read as the same idea."""
    packages = {path.parent.name for path in runtime_files() if path.name == "__init__.py"}
    clashes = [shown(path) for path in runtime_files()
               if path.stem in packages and path.name != "__init__.py"]
    assert clashes == []


def test_no_two_classes_share_a_name():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in runtime_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                by_name[node.name].append(f"{shown(path)}:{node.lineno}")
    shared = {name: places for name, places in by_name.items()
              if len(places) > 1 and name not in SHARED_CLASS_NAMES}
    assert shared == {}
