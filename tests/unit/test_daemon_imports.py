"""What `nodeproxy run` imports before it serves stays out of the heavy packages a default
configuration never uses: the daemon keeps every module it imports for its whole life,
and its imports were most of its resident set (docs/benchmarks.md, "Daemon start-up
memory").  A fresh interpreter makes the imports the daemon makes (the CLI's parser for
`run`, then every import statement of cli/run.py's `run` and `preflight_failures`, read
from its source so the list cannot drift) and reports sys.modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nodeproxy.cli.run

# Package (or module) -> why the daemon must not import it at start-up.
KEPT_OUT = {
    "pyroute2": "imports every netlink family, ndb's sqlite3 and unittest.mock: ~9 MiB "
                "(capture/rtnetlink.py makes the four requests the daemon needs)",
    "sqlite3": "pyroute2's ndb",
    "unittest": "pyroute2's iprsocket (unittest.mock)",
    "bcc": "LLVM and clang: the loading child compiles, the daemon never imports bcc",
    "opentelemetry": "only when tracing is configured (telemetry/request_spans.py)",
    "grpc": "a test and bench dependency",
    "kubernetes_asyncio": "only with Kubernetes discovery (discovery/kubernetes.py)",
    "nodeproxy_dev": "development tooling: the daemon never needs `nodeproxy bench`",
    "nodeproxy.cni": "the CNI plugin and its installer",
    "nodeproxy.signer.signing_service": "the CA's signing service (`nodeproxy ca serve`)",
    "nodeproxy.signer.kube": "the signing service's Kubernetes client",
    "aiohttp": "the daemon's HTTP faces run on nodeproxy.admin.http_server; aiohttp's "
               "package imports its client half on any import: about 11 MiB with yarl, "
               "multidict, frozenlist, attrs (only with a remote signer or Kubernetes "
               "discovery, which use its client)",
    **{name: "aiohttp's own dependencies" for name in ("yarl", "multidict", "frozenlist",
                                                       "aiosignal", "propcache")},
    "nodeproxy.signer.signing_client": "only with identity.signer (it imports aiohttp)",
    "cryptography": "only with mTLS (identity.caCert): the CA or the signing client loads it "
                    "at start-up (signer/node_identity.py); about 7 MiB",
    **{f"nodeproxy.cli.{name}": "another subcommand"
       for name in ("ca", "check", "validate", "enroll", "unenroll", "uninstall", "stat",
                    "top")},
}


def run_imports() -> list[str]:
    """Modules imported inside cli/run.py's functions (where the daemon's imports are)."""
    tree = ast.parse(Path(nodeproxy.cli.run.__file__).read_text())
    names: list[str] = []
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in ("run", "preflight_failures"):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.append(node.module)
                    names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def daemon_modules() -> set[str]:
    script = (
        "import importlib, json, sys\n"
        "from nodeproxy.cli import main\n"
        "main.build_parser('run')\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass  # a name imported from a module, not a module\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, json.dumps(run_imports())],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(json.loads(out))


def test_the_daemon_imports_what_it_serves_with() -> None:
    """The check sees the daemon's real import set: it holds the event loop, the daemon,
    the config model and the admin server (so an empty or broken list would fail here)."""
    modules = daemon_modules()
    assert {"uvloop", "nodeproxy.daemon", "nodeproxy.daemon.lifecycle",
            "nodeproxy.config.model", "nodeproxy.admin.server", "httptools",
            "nodeproxy.capture.rtnetlink"} <= modules


def test_no_heavy_module_comes_back_into_the_daemons_start_up() -> None:
    modules = daemon_modules()
    found = {kept: why for kept, why in KEPT_OUT.items()
             if any(m == kept or m.startswith(kept + ".") for m in modules)}
    assert not found, f"the daemon's start-up imports these again: {found}"


def test_other_subcommands_still_import_what_they_need() -> None:
    """Building the parser for one subcommand leaves the others' modules alone; without
    one (help), every subcommand is there."""
    script = ("import sys\nfrom nodeproxy.cli import main\n"
              "main.build_parser(sys.argv[1] if len(sys.argv) > 1 else None)\n"
              "print('nodeproxy.cli.ca' in sys.modules, 'nodeproxy.cli.run' in sys.modules)\n")
    for argv, expected in (([], "True True"), (["ca"], "True False"),
                           (["run"], "False True")):
        out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                             text=True, timeout=120, check=True).stdout.strip()
        assert out == expected, (argv, out)
