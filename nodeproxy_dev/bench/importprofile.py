"""Where the daemon's start-up memory goes: its imports, a profile, not a benchmark.

Run as ``python -m nodeproxy_dev.bench.importprofile [--top N] [--json FILE]`` (no root
needed).  In a fresh interpreter it makes the imports ``nodeproxy run`` makes before the
daemon serves (the CLI's parser, the run subcommand's own imports, uvloop, the daemon),
with a hook around the import machinery that reads, for every module, the resident set
(``/proc/self/statm``) and the Python allocations (``tracemalloc``) before and after,
like ``python -X importtime`` does for time.  Printed:

- the interpreter's RSS before any of it and after each step;
- per top-level package, the RSS and Python allocations its modules added themselves
  (a module's *self* figure leaves out the modules it imported);
- the modules with the largest self RSS and their inclusive figures;
- the RSS by mapping after the imports (``/proc/self/smaps``): the interpreter, each
  shared library (libcrypto, libssl, uvloop's and pydantic-core's extensions, ...), the
  heap and anonymous memory.

tracemalloc costs memory of its own (its traces), which is not counted in the RSS steps:
``--no-tracemalloc`` gives the RSS alone, without that overhead.  Only the standard
library is imported here before the profile starts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib._bootstrap as bootstrap
import json
import os
import re
import sys
import time
import tracemalloc
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kib() -> int:
    """This process's resident set, KiB (statm: cheaper than status, read per import)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


@dataclass
class ModuleCost:
    name: str
    inclusive_rss_kib: int = 0
    self_rss_kib: int = 0
    inclusive_py_kib: float = 0.0
    self_py_kib: float = 0.0
    seconds: float = 0.0
    parent: str | None = None


@dataclass
class ImportHook:
    """Wraps ``importlib._bootstrap._find_and_load`` (which the import statement calls for
    every module not yet in ``sys.modules``) and records each module's cost."""

    trace_python: bool
    costs: dict[str, ModuleCost] = field(default_factory=dict)
    _stack: list[list[int | float]] = field(default_factory=list)

    def install(self) -> None:
        original = bootstrap._find_and_load

        def find_and_load(name: str, import_: Any) -> Any:
            if name in sys.modules:
                return original(name, import_)
            py = tracemalloc.get_traced_memory()[0] if self.trace_python else 0
            frame = [rss_kib(), py, time.perf_counter(), 0, 0.0]  # child rss, child py
            parent = self._stack_names[-1] if self._stack_names else None
            self._stack.append(frame)
            self._stack_names.append(name)
            try:
                return original(name, import_)
            finally:
                self._stack.pop()
                self._stack_names.pop()
                rss = rss_kib() - int(frame[0])
                py_now = tracemalloc.get_traced_memory()[0] if self.trace_python else 0
                py_kib = (py_now - frame[1]) / 1024
                cost = ModuleCost(name, rss, rss - int(frame[3]), py_kib, py_kib - frame[4],
                                  time.perf_counter() - frame[2], parent)
                self.costs.setdefault(name, cost)
                if self._stack:
                    self._stack[-1][3] += rss
                    self._stack[-1][4] += py_kib

        self._stack_names: list[str] = []
        bootstrap._find_and_load = find_and_load


def daemon_imports() -> list[tuple[str, Any]]:
    """The steps of ``nodeproxy run``'s start-up, in its order (cli/main.py, cli/run.py)."""

    def parser() -> None:
        main = importlib.import_module("nodeproxy.cli.main")
        main.build_parser("run")

    def run_imports() -> None:
        importlib.import_module("nodeproxy.capture.preflight")
        importlib.import_module("nodeproxy.config.loader")

    def daemon() -> None:
        importlib.import_module("uvloop")
        importlib.import_module("nodeproxy.daemon")

    return [("CLI parser (nodeproxy.cli.main.build_parser(\"run\"))", parser),
            ("run: preflight, config loader", run_imports),
            ("run: uvloop, nodeproxy.daemon", daemon)]


def smaps_by_mapping() -> dict[str, int]:
    """RSS (KiB) per mapped file, plus [heap] and anonymous memory, from /proc/self/smaps."""
    totals: dict[str, int] = defaultdict(int)
    current = "[anon]"
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
    with open("/proc/self/smaps") as f:
        for line in f:
            if header.match(line):
                parts = line.split(None, 5)
                current = parts[5].strip() if len(parts) > 5 and parts[5].strip() else "[anon]"
            elif line.startswith("Rss:"):
                totals[current] += int(line.split()[1])
    return dict(totals)


def group_mapping(path: str) -> str:
    """A mapping's short name: the file's base name (versions dropped), or [heap]/[anon]."""
    if path.startswith("["):
        return path
    base = os.path.basename(path)
    return re.sub(r"\.cpython-[^.]*\.so$|\.so(\.[0-9.]+)?$", ".so", base)


def top_package(name: str) -> str:
    head = name.split(".")[0]
    if head == "nodeproxy":
        return ".".join(name.split(".")[:2])
    return head


def profile(trace_python: bool) -> dict[str, Any]:
    if trace_python:
        tracemalloc.start(1)
    hook = ImportHook(trace_python)
    steps = [{"step": "interpreter and this profiler", "rss_kib": rss_kib(),
              "modules": len(sys.modules)}]
    hook.install()
    for label, step in daemon_imports():
        step()
        steps.append({"step": label, "rss_kib": rss_kib(), "modules": len(sys.modules)})
    packages: dict[str, dict[str, float]] = defaultdict(lambda: {"rss_kib": 0, "py_kib": 0.0,
                                                                 "modules": 0, "seconds": 0.0})
    for cost in hook.costs.values():
        bucket = packages[top_package(cost.name)]
        bucket["rss_kib"] += cost.self_rss_kib
        bucket["py_kib"] += cost.self_py_kib
        bucket["modules"] += 1
    mappings: dict[str, int] = defaultdict(int)
    for path, kib in smaps_by_mapping().items():
        mappings[group_mapping(path)] += kib
    return {
        "python": sys.version.split()[0],
        "tracemalloc": trace_python,
        "steps": steps,
        "packages": dict(packages),
        "modules": [asdict(c) for c in hook.costs.values()],
        "mappings": dict(mappings),
        "sys_modules": sorted(sys.modules),
    }


def print_report(result: dict[str, Any], top: int) -> None:
    print("step | RSS MiB | modules")
    for step in result["steps"]:
        print(f"{step['step']} | {step['rss_kib'] / 1024:.1f} | {step['modules']}")
    print()
    print("package (self) | RSS KiB | Python KiB | modules")
    packages = sorted(result["packages"].items(), key=lambda kv: -kv[1]["rss_kib"])
    for name, b in packages[:top]:
        print(f"{name} | {b['rss_kib']:.0f} | {b['py_kib']:.0f} | {b['modules']:.0f}")
    print()
    print("module | self RSS KiB | inclusive RSS KiB | self Python KiB | imported by")
    modules = sorted(result["modules"], key=lambda m: -m["self_rss_kib"])
    for m in modules[:top]:
        print(f"{m['name']} | {m['self_rss_kib']} | {m['inclusive_rss_kib']} | "
              f"{m['self_py_kib']:.0f} | {m['parent']}")
    print()
    print("mapping | RSS KiB")
    for name, kib in sorted(result["mappings"].items(), key=lambda kv: -kv[1])[:top]:
        print(f"{name} | {kib}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--json", metavar="FILE", help="write every module's figures")
    parser.add_argument("--no-tracemalloc", action="store_true",
                        help="RSS only, without tracemalloc's own overhead")
    args = parser.parse_args(argv)
    result = profile(not args.no_tracemalloc)
    print_report(result, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
