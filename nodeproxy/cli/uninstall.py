"""Remove every attachment, pin and CNI configuration nodeproxy left on this node.

What it removes, and prints, one line each:

- the pinned links and maps under ``<bpffs>/nodeproxy/<node>`` (``--node``) or
  under ``<bpffs>/nodeproxy`` (``--all``).  Removing a pinned link detaches its
  capture program once no process holds it, so after a crashed daemon
  (``capture.onCrash: fail_closed``) this is what lets pods talk directly again;
- with ``--cni-conf-dir``, the nodeproxy-cni entry of every chained conflist
  there (each file is rewritten without it; other files are not touched);
- with ``--cni-bin-dir``, the ``nodeproxy-cni`` binary, if the DaemonSet's init
  container installed it (``python -m nodeproxy.cni.install`` marks its archive);
  a binary installed any other way is left and reported.

It is idempotent: a second run prints "nothing to remove".  While a daemon
answers on the control socket it refuses (exit 1) unless ``--force``: a running
daemon removes its own attachments when it stops, and taking the CNI entry away
under it lets new pods start outside the mesh.

``--only-if-leaving`` is for the DaemonSet's preStop hook: it acts only when
the node is leaving the mesh, which it reads as "the DaemonSet's namespace is
being deleted" (``kubectl delete -k config/k8s``); on a rolling update or a
restart it removes nothing, so new pods keep failing closed until the next
daemon is up.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nodeproxy.admin.control_client import DEFAULT_SOCKET, request
from nodeproxy.capture.programs import pin_root, remove_pins
from nodeproxy.cni import conflist, kubeapi
from nodeproxy.cni.install import BINARY_NAME, installed_by_us


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bpffs", default="/sys/fs/bpf", help="bpffs mount (default %(default)s)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--node", help="remove this node's pins")
    which.add_argument("--all", action="store_true", help="remove the pins of every node")
    parser.add_argument("--cni-conf-dir", help="take nodeproxy-cni out of the conflists here")
    parser.add_argument("--cni-bin-dir",
                        help="remove the nodeproxy-cni binary here if the init container "
                             "installed it")
    parser.add_argument("--control-socket", default=DEFAULT_SOCKET,
                        help="the daemon's control socket: a daemon answering there "
                             "means it is running (default %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="remove even while a daemon is running")
    parser.add_argument("--only-if-leaving", action="store_true",
                        help="act only if the namespace --namespace is being deleted "
                             "(the DaemonSet's preStop hook)")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE",
                                                              "nodeproxy-system"),
                        help="the DaemonSet's namespace, for --only-if-leaving "
                             "(default: $POD_NAMESPACE or %(default)s)")


def daemon_running(control_socket: str) -> bool:
    """Whether a daemon answers on the control socket."""
    try:
        request(control_socket, "GET", "/v1/pods", timeout=2.0)
    except OSError:  # no socket file, or a stale one nobody listens on
        return False
    except Exception:  # it answered, if oddly: something is running there
        return True
    return True


def leaving(namespace: str) -> tuple[bool, str]:
    """Whether this node is leaving the mesh, and why we think so."""
    try:
        if kubeapi.namespace_terminating(namespace):
            return True, f"namespace {namespace} is being deleted: the mesh is being removed"
    except kubeapi.ApiUnavailable as e:
        return False, f"cannot ask the API server ({e}): assuming a restart"
    return False, (f"namespace {namespace} stays: a rolling update or a restart, "
                   "so the CNI configuration is kept")


def _pin_lines(pins: Path) -> list[str]:
    lines = []
    for path in remove_pins(pins):
        kind = "pinned link" if "/links/" in path else "pinned map" if "/maps/" in path \
            else "pin"
        lines.append(f"removed {kind} {path}")
    return lines


def remove_all_pins(bpffs: str, node: str | None) -> list[str]:
    """Remove one node's pin directory, or every node's; what was removed."""
    if node is not None:
        return _pin_lines(pin_root(bpffs, node))
    root = Path(bpffs) / "nodeproxy"
    lines: list[str] = []
    if root.is_dir():
        for node_dir in sorted(root.iterdir()):
            if node_dir.is_dir():
                lines += _pin_lines(node_dir)
    return lines


def remove_cni(conf_dir: str | None, bin_dir: str | None) -> list[str]:
    """Take nodeproxy-cni out of the conf dir's lists and remove its binary if ours."""
    lines = []
    if conf_dir:
        for path in conflist.remove(conf_dir):
            lines.append(f"removed nodeproxy-cni from {path}")
    if bin_dir:
        binary = Path(bin_dir) / BINARY_NAME
        if installed_by_us(binary):
            binary.unlink()
            lines.append(f"removed {binary}")
        elif binary.exists():
            lines.append(f"left {binary}: not installed by nodeproxy's init container")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.only_if_leaving:
        is_leaving, why = leaving(args.namespace)
        print(f"nodeproxy uninstall: {why}")
        if not is_leaving:
            return 0
    if daemon_running(args.control_socket):
        if not args.force:
            print(f"nodeproxy uninstall: a daemon is running (it answers on "
                  f"{args.control_socket}); stop it first — it removes its own attachments "
                  f"when it stops — or pass --force", file=sys.stderr)
            return 1
        print("nodeproxy uninstall: --force: a daemon is running; its links stay attached "
              "until it exits")
    lines = remove_cni(args.cni_conf_dir, args.cni_bin_dir)
    lines += remove_all_pins(args.bpffs, None if args.all else args.node)
    for line in lines:
        print(line)
    if not lines:
        print("nothing to remove")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m nodeproxy.cli.uninstall``), same as ``nodeproxy uninstall``."""
    parser = argparse.ArgumentParser(prog="nodeproxy uninstall",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
