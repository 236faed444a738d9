"""nodeproxy-cni in the real CNI chain, run exactly as a container runtime runs it.

The conflist is the testbed node's own (Debian's bridge with host-local IPAM, then
loopback) with nodeproxy-cni chained last.  Every plugin is executed inside the
node's netns with CNI_COMMAND / CNI_CONTAINERID / CNI_NETNS / CNI_IFNAME /
CNI_PATH / CNI_ARGS and its netconf on stdin, ADD in order with each result fed
to the next as ``prevResult``, CHECK in order and DEL in reverse with the final
result.  CNI_PATH is a directory of this test's that links Debian's plugins and
nodeproxy-cni: the venv's console script, or the zipapp ``--zipapp`` installs
(run by the system's /usr/bin/python3, outside the venv).  The self-contained
executable the init container installs by default (``make cni-plugin``) runs in
the same chain from a root filesystem without python3 (``bare_root``).

The input-error tests at the end run the plugin alone and need no root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodeproxy.cni import install
from nodeproxy_dev.testbed import cgroups, cni, netns
from nodeproxy_dev.testbed.cluster import REPO_ROOT, VIP_RANGE4, VIP_RANGE6, Cluster, Pod
from tests.integration.probes import connect

PORT = 7000
PLUGIN = "nodeproxy-cni"
CONSOLE_SCRIPT = Path(sys.executable).with_name(PLUGIN)
DEBIAN_PLUGINS = Path(cni.DEFAULT_PLUGIN_DIR)


# ---------------------------------------------------------------------------
# A container runtime's view of the chain


@dataclass
class PluginRun:
    """One plugin execution: what the runtime sees."""

    plugin: str
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class ChainError(AssertionError):
    def __init__(self, run: PluginRun):
        super().__init__(f"{run.plugin} failed (exit {run.returncode}): "
                         f"{run.stdout.strip() or run.stderr.strip()}")
        self.run = run


@dataclass
class Chain:
    """A conflist and the runtime actions on it (ADD, CHECK, DEL), in one node's netns."""

    node_netns: str
    cni_path: str
    conflist: dict[str, Any]
    # argv before the plugin's path (in the node's netns), e.g. a chroot (see bare_root)
    runner: tuple[str, ...] = ()

    def invoke(self, plugin: Mapping[str, Any], command: str, container_id: str,
               netns_path: str, cni_args: str, prev_result: Any = None,
               ifname: str = "eth0") -> PluginRun:
        conf = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"],
                **plugin}
        if prev_result is not None:
            conf["prevResult"] = prev_result
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.cni_path,
            "CNI_ARGS": cni_args,
        }
        binary = os.path.join(self.cni_path, plugin["type"])
        proc = subprocess.run(netns.nsenter_argv(self.node_netns, [*self.runner, binary]),
                              input=json.dumps(conf), capture_output=True, text=True, env=env,
                              timeout=60)
        return PluginRun(plugin["type"], proc.returncode, proc.stdout, proc.stderr)

    def add(self, container_id: str, netns_path: str, cni_args: str
            ) -> tuple[dict[str, Any], list[PluginRun]]:
        """ADD in order; a failure runs DEL over the chain (as runtimes do) and raises."""
        result: Any = None
        runs = []
        for plugin in self.conflist["plugins"]:
            run = self.invoke(plugin, "ADD", container_id, netns_path, cni_args, result)
            runs.append(run)
            if run.returncode != 0:
                self.delete(container_id, netns_path, cni_args, result)
                raise ChainError(run)
            result = run.json()
        return result, runs

    def check(self, container_id: str, netns_path: str, cni_args: str,
              result: dict[str, Any]) -> list[PluginRun]:
        return [self.invoke(p, "CHECK", container_id, netns_path, cni_args, result)
                for p in self.conflist["plugins"]]

    def delete(self, container_id: str, netns_path: str, cni_args: str,
               result: dict[str, Any] | None) -> list[PluginRun]:
        return [self.invoke(p, "DEL", container_id, netns_path, cni_args, result)
                for p in reversed(self.conflist["plugins"])]

    def plugin(self, type_: str) -> dict[str, Any]:
        return next(p for p in self.conflist["plugins"] if p["type"] == type_)


def plugin_dir(directory: Path, nodeproxy_cni: Path) -> Path:
    """A CNI_PATH: links to Debian's plugins and to this nodeproxy-cni."""
    directory.mkdir()
    for plugin in DEBIAN_PLUGINS.iterdir():
        (directory / plugin.name).symlink_to(plugin)
    (directory / PLUGIN).symlink_to(nodeproxy_cni)
    return directory


@pytest.fixture(scope="module")
def cni_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """CNI_PATHs with the console script and with the init container's zipapp."""
    if not CONSOLE_SCRIPT.exists():
        pytest.fail(f"{CONSOLE_SCRIPT} is missing: run `make setup` (pip install -e .)")
    root = tmp_path_factory.mktemp("cni")
    zipapp, _ = install.install_zipapp(root / "installed", interpreter="/usr/bin/python3")
    return {"console-script": str(plugin_dir(root / "bin-script", CONSOLE_SCRIPT)),
            "zipapp": str(plugin_dir(root / "bin-zipapp", zipapp))}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Cluster]:
    """node0 with its daemon, a server pod behind service `web` and a non-mesh reference pod."""
    with Cluster(1) as c:
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        c.write_configs()
        c.start_daemons()
        yield c


def chain(c: Cluster, cni_path: str, runner: tuple[str, ...] = (), **plugin_conf: Any
          ) -> Chain:
    node = c.nodes["node0"]
    conflist = node.network.conflist()
    conflist["plugins"].append({"type": PLUGIN, "controlSocket": node.control_socket,
                                "timeoutSeconds": 20, **plugin_conf})
    return Chain(node.netns_path, cni_path, conflist, runner)


def new_sandbox(c: Cluster, name: str, namespace: str = "default") -> Pod:
    """A pod sandbox as a runtime makes it before CNI ADD: a netns and the kubelet's cgroup.

    It is registered with the testbed so teardown kills its processes, runs the
    node network's DEL, and removes its netns and cgroup, even if a test fails.
    """
    node = c.nodes["node0"]
    ns_name = c.name(name)
    pod = Pod(name=name, namespace=namespace, node="node0", service_account="default",
              labels={}, netns=ns_name, netns_path=netns.path_of(ns_name),
              cgroup=os.path.join(node.cgroup, "pods", name), ips=[], enrolled=False)
    c.pods[name] = pod
    netns.add(ns_name)
    netns.sysctl(ns_name, {"net.ipv6.conf.all.accept_dad": 0,
                           "net.ipv6.conf.default.accept_dad": 0})
    for family, vip_range in (("-4", VIP_RANGE4), ("-6", VIP_RANGE6)):
        subprocess.run(["ip", "-n", ns_name, family, "route", "add", "unreachable", vip_range],
                       check=True, capture_output=True)
    assert pod.cgroup is not None
    cgroups.create(pod.cgroup)
    return pod


def k8s_args(pod: Pod, extra: str = "") -> str:
    """CNI_ARGS as the kubelet's runtime passes them, plus the testbed's cgroup hint."""
    args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={pod.netns};K8S_POD_UID={uuid.uuid4()};"
            f"NODEPROXY_CGROUP={pod.cgroup}")
    return f"{args};{extra}" if extra else args


def enrolled(c: Cluster) -> dict[str, dict[str, Any]]:
    return {f"{p['namespace']}/{p['name']}": p for p in c.admin_json("node0", "/pods")}


def cni_error(run: PluginRun) -> dict[str, Any]:
    assert run.returncode != 0, f"{run.plugin} succeeded: {run.stdout}"
    error: dict[str, Any] = run.json()
    assert set(error) >= {"cniVersion", "code", "msg"}, error
    return error


# ---------------------------------------------------------------------------
# The chain against a running daemon


@pytest.mark.privileged
@pytest.mark.parametrize("binary", ["console-script", "zipapp"])
def test_add_captures_check_passes_del_releases(mesh: Cluster, cni_paths: dict[str, str],
                                                binary: str):
    c = mesh
    ch = chain(c, cni_paths[binary])
    pod = new_sandbox(c, f"cni-{binary[0]}")
    args = k8s_args(pod)
    result, runs = ch.add(pod.netns, pod.netns_path, args)
    pod.cni_result, pod.ips = result, cni.result_ips(result)
    # The chained plugin hands the previous result on, byte for byte the same JSON.
    assert runs[-1].plugin == PLUGIN and runs[-2].plugin == "loopback"
    assert runs[-1].json() == runs[-2].json()
    # ADD returned, so capture is in place: the daemon lists the pod, and the pod's
    # connect to the service VIP reaches the server through the proxy, from its own IP.
    listed = enrolled(c)[pod.key]
    assert listed["netns"] == pod.netns_path and sorted(listed["ips"]) == sorted(pod.ips)
    assert listed["cgroup"] == pod.cgroup and listed["source"] == "runtime"
    answer = connect(c, pod.name, c.services["default/web"].vip4, 80)
    assert answer.startswith("connected") and pod.ip4 in answer, answer
    assert all(r.returncode == 0 for r in ch.check(pod.netns, pod.netns_path, args, result))

    # DEL runs nodeproxy-cni first (reverse order): released, network still intact.
    ours = ch.plugin(PLUGIN)
    first = ch.invoke(ours, "DEL", pod.netns, pod.netns_path, args, result)
    assert first.returncode == 0 and first.stdout.strip() == "", first
    assert pod.key not in enrolled(c)
    assert connect(c, pod.name, c.services["default/web"].vip4, 80) == "EHOSTUNREACH"
    assert pod.ip4 in connect(c, pod.name, c.pods["web-0"].ip4, PORT)
    # CHECK now fails: the pod is not enrolled.
    check = ch.invoke(ours, "CHECK", pod.netns, pod.netns_path, args, result)
    error = cni_error(check)
    assert error["code"] == 100 and pod.key in error["msg"]
    # DEL is idempotent: again, through the whole chain, and once the netns is gone.
    assert all(r.returncode == 0 for r in ch.delete(pod.netns, pod.netns_path, args, result))
    again = ch.invoke(ours, "DEL", pod.netns, "", args, result)
    assert again.returncode == 0, again
    c.remove_pod(pod.name)


@pytest.mark.privileged
def test_opted_out_pods_are_passed_through(mesh: Cluster, cni_paths: dict[str, str]):
    c = mesh
    ch = chain(c, cni_paths["console-script"], excludeNamespaces=["kube-system"])
    vip = c.services["default/web"].vip4
    for name, namespace, extra in (
            ("cni-optout", "default", "NODEPROXY_LABELS=app:x,nodeproxy.io/dataplane-mode:none"),
            ("cni-excluded", "kube-system", "")):
        pod = new_sandbox(c, name, namespace)
        args = k8s_args(pod, extra)
        result, runs = ch.add(pod.netns, pod.netns_path, args)
        pod.cni_result = result
        assert runs[-1].json() == runs[-2].json()
        assert "not enrolled" in runs[-1].stderr, runs[-1].stderr
        assert pod.key not in enrolled(c)
        assert connect(c, name, vip, 80) == "EHOSTUNREACH"  # not captured
        # CHECK agrees that an opted-out pod needs no enrollment.
        assert ch.invoke(ch.plugin(PLUGIN), "CHECK", pod.netns, pod.netns_path, args,
                         result).returncode == 0
        c.remove_pod(name)


@pytest.mark.privileged
def test_check_fails_for_a_pod_the_daemon_does_not_have(mesh: Cluster,
                                                        cni_paths: dict[str, str]):
    c = mesh
    ch = chain(c, cni_paths["console-script"])
    pod = new_sandbox(c, "cni-notours")
    # Wired by the primary plugins only: never seen by nodeproxy-cni.
    primary = Chain(ch.node_netns, ch.cni_path,
                    dict(ch.conflist, plugins=ch.conflist["plugins"][:-1]))
    result, _ = primary.add(pod.netns, pod.netns_path, k8s_args(pod))
    pod.cni_result = result
    error = cni_error(ch.invoke(ch.plugin(PLUGIN), "CHECK", pod.netns, pod.netns_path,
                                k8s_args(pod), result))
    assert error["code"] == 100 and "not enrolled" in error["msg"]
    # DEL of a pod the daemon never had succeeds (the daemon answers 404).
    assert ch.invoke(ch.plugin(PLUGIN), "DEL", pod.netns, pod.netns_path, k8s_args(pod),
                     result).returncode == 0
    c.remove_pod(pod.name)


@pytest.mark.privileged
def test_a_second_sandbox_is_refused_and_its_del_keeps_the_first(mesh: Cluster,
                                                                 cni_paths: dict[str, str]):
    """The daemon refuses a pod name already enrolled from another netns (CNI code 101),
    and the DEL the runtime then runs, or a late DEL of an old sandbox, leaves the
    current sandbox's enrollment alone."""
    c = mesh
    ch = chain(c, cni_paths["console-script"])
    current = new_sandbox(c, "cni-twin-a")
    args = k8s_args(current).replace("K8S_POD_NAME=cni-twin-a", "K8S_POD_NAME=twin")
    result, _ = ch.add(current.netns, current.netns_path, args)
    current.cni_result, current.ips = result, cni.result_ips(result)
    other = new_sandbox(c, "cni-twin-b")
    other_args = (k8s_args(other).replace("K8S_POD_NAME=cni-twin-b", "K8S_POD_NAME=twin")
                  .replace(str(other.cgroup), str(current.cgroup)))
    with pytest.raises(ChainError) as refused:
        ch.add(other.netns, other.netns_path, other_args)  # then DEL, as a runtime does
    error = cni_error(refused.value.run)
    assert error["code"] == 101 and "default/twin" in error["msg"], error
    assert "already enrolled" in error["details"]
    # Still enrolled with the first sandbox, still captured.
    assert enrolled(c)["default/twin"]["netns"] == current.netns_path
    assert connect(c, current.name, c.services["default/web"].vip4, 80).startswith("connected")
    # A DEL without netns while the enrolled netns exists leaves it too.
    ours = ch.plugin(PLUGIN)
    assert ch.invoke(ours, "DEL", other.netns, "", other_args).returncode == 0
    assert "default/twin" in enrolled(c)
    # The sandbox's own DEL releases it.
    assert ch.invoke(ours, "DEL", current.netns, current.netns_path, args,
                     result).returncode == 0
    assert "default/twin" not in enrolled(c)
    c.remove_pod(other.name)
    c.remove_pod(current.name)


@pytest.mark.privileged
def test_daemon_unreachable_fails_closed_unless_fail_open(mesh: Cluster,
                                                          cni_paths: dict[str, str],
                                                          tmp_path: Path):
    c = mesh
    stale = tmp_path / "stale.sock"  # a socket file nobody listens on (a crashed daemon's)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    for sock in (str(tmp_path / "absent.sock"), str(stale)):
        ch = chain(c, cni_paths["console-script"], controlSocket=sock)
        pod = new_sandbox(c, f"cni-down{len(c.pods)}")
        with pytest.raises(ChainError) as failed:
            ch.add(pod.netns, pod.netns_path, k8s_args(pod))
        error = cni_error(failed.value.run)
        assert failed.value.run.plugin == PLUGIN
        assert error["code"] == 11 and sock in error["msg"], error
        assert "fail" in error["details"]
        c.remove_pod(pod.name)

    ch = chain(c, cni_paths["console-script"], controlSocket=str(stale), failOpen=True)
    pod = new_sandbox(c, "cni-failopen")
    result, runs = ch.add(pod.netns, pod.netns_path, k8s_args(pod))
    pod.cni_result = result
    assert runs[-1].json() == runs[-2].json()
    assert "failOpen" in runs[-1].stderr and str(stale) in runs[-1].stderr
    assert pod.key not in enrolled(c)
    # The pod started outside the mesh: direct traffic flows, the VIP is not captured.
    assert connect(c, pod.name, c.services["default/web"].vip4, 80) == "EHOSTUNREACH"
    # DEL with the daemon unreachable succeeds (nothing to release there).
    assert all(r.returncode == 0 for r in ch.delete(pod.netns, pod.netns_path,
                                                     k8s_args(pod), result))
    c.remove_pod(pod.name)


# ---------------------------------------------------------------------------
# The self-contained executable (make cni-plugin), on a node without python3

# Runs argv[2:] chrooted into $1 in a private mount namespace (nothing mounted here
# outlives the plugin run or propagates back to the machine), with what a node's
# root always has: /proc, and the paths the runtime hands the plugin (the netns
# files, the node's directory with the IPAM state and the daemon's control socket).
CHROOT = """set -e
root=$1 node_dir=$2; shift 2
mount -t proc proc "$root/proc"
mount --rbind /run/netns "$root/run/netns"
mount --bind "$node_dir" "$root$node_dir"
exec chroot "$root" "$@"
"""


def chroot_runner(root: Path, node_dir: str) -> tuple[str, ...]:
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT, "sh",
            str(root), node_dir)


@pytest.fixture(scope="module")
def static_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nodeproxy-cni built by scripts/build-cni-plugin.sh, as `make cni-plugin` builds it."""
    out = tmp_path_factory.mktemp("cni-build") / PLUGIN
    build = subprocess.run(["nice", "-n", "10", "bash", "scripts/build-cni-plugin.sh", str(out),
                            sys.executable], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def libraries_of(binary: Path) -> list[str]:
    """The shared objects (and the loader) a dynamically linked binary needs (ldd)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            found.append(path)
    return found


def python_anywhere(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith("python")]


@pytest.fixture(scope="module")
def bare_root(mesh: Cluster, static_plugin: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node root filesystem with no python3: Debian's CNI plugins and the C library
    they link, the plugin the init container's installer copied, empty /proc, /tmp,
    /run/netns and the node directory's mount point."""
    root = tmp_path_factory.mktemp("bare-root")
    bin_dir = root / "opt" / "cni" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("bridge", "host-local", "loopback"):
        shutil.copy2(DEBIAN_PLUGINS / name, bin_dir / name)
        for library in libraries_of(DEBIAN_PLUGINS / name):
            target = root / library.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), target)
    install.install_executable(bin_dir, static_plugin)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    for directory in ("proc", "run/netns", mesh.nodes["node0"].dir.lstrip("/")):
        (root / directory).mkdir(parents=True, exist_ok=True)
    assert python_anywhere(root) == []
    return root


@pytest.mark.privileged
def test_static_plugin_needs_nothing_but_proc_and_tmp(static_plugin: Path,
                                                      tmp_path: Path):
    """Alone in a root with no loader, no libc, no python3, the executable answers
    VERSION, and leaves nothing behind in /tmp (it unpacks itself there per run)."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    installed, _ = install.install_executable(root / "bin", static_plugin)
    assert install.installed_by_us(installed)
    assert sorted(p.name for p in (root / "bin").iterdir()) == [PLUGIN]
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t proc proc "$1/proc" && exec chroot "$1" /bin/nodeproxy-cni', "sh",
            str(root)]
    run = subprocess.run(argv, input='{"cniVersion": "1.0.0"}', capture_output=True,
                         text=True, env={"CNI_COMMAND": "VERSION"}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["supportedVersions"][-1] == "1.0.0"
    assert list((root / "tmp").iterdir()) == []
    # Bad input still gets the plugin's own CNI error, not a crash of the packing.
    run = subprocess.run(argv, input="{", capture_output=True, text=True,
                         env={"CNI_COMMAND": "ADD"}, timeout=60)
    error = cni_error(PluginRun(PLUGIN, run.returncode, run.stdout, run.stderr))
    assert error["code"] == 6 and "not valid JSON" in error["msg"]


@pytest.mark.privileged
def test_static_plugin_adds_and_deletes_a_pod_from_a_root_without_python(
        mesh: Cluster, bare_root: Path):
    c = mesh
    node = c.nodes["node0"]
    ch = chain(c, "/opt/cni/bin", chroot_runner(bare_root, node.dir))
    pod = new_sandbox(c, "cni-static")
    args = k8s_args(pod)
    tmp_before = sorted((bare_root / "tmp").rglob("*"))
    started = time.monotonic()
    result, runs = ch.add(pod.netns, pod.netns_path, args)
    add_seconds = time.monotonic() - started
    pod.cni_result, pod.ips = result, cni.result_ips(result)
    assert [r.plugin for r in runs] == ["bridge", "loopback", PLUGIN]
    assert runs[-1].json() == runs[-2].json()
    listed = enrolled(c)[pod.key]
    assert listed["netns"] == pod.netns_path and sorted(listed["ips"]) == sorted(pod.ips)
    answer = connect(c, pod.name, c.services["default/web"].vip4, 80)
    assert answer.startswith("connected") and pod.ip4 in answer, answer
    assert all(r.returncode == 0 for r in ch.check(pod.netns, pod.netns_path, args, result))
    first = ch.invoke(ch.plugin(PLUGIN), "DEL", pod.netns, pod.netns_path, args, result)
    assert first.returncode == 0 and first.stdout.strip() == "", first
    assert pod.key not in enrolled(c)
    assert connect(c, pod.name, c.services["default/web"].vip4, 80) == "EHOSTUNREACH"
    assert all(r.returncode == 0 for r in ch.delete(pod.netns, pod.netns_path, args, result))
    c.remove_pod(pod.name)
    # Still no python3 in the root, and nothing left in its /tmp (the plugin unpacks
    # itself there on every run).
    assert python_anywhere(bare_root) == []
    assert sorted((bare_root / "tmp").rglob("*")) == tmp_before
    print(f"whole chain ADD from the bare root: {add_seconds:.2f} s")


# ---------------------------------------------------------------------------
# Bad input: each gives its own CNI error (no daemon, no root needed)

PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.0.9/24"}]}
GOOD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}
GOOD_CONF = {"cniVersion": "1.0.0", "name": "k8s", "type": PLUGIN,
             "controlSocket": "/nonexistent/control.sock", "prevResult": PREV}


def run_plugin(env: Mapping[str, str], stdin: str) -> PluginRun:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    proc = subprocess.run([str(CONSOLE_SCRIPT)], input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=30)
    return PluginRun(PLUGIN, proc.returncode, proc.stdout, proc.stderr)


def without(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(("case", "env", "stdin", "code", "says"), [
    ("no CNI_NETNS on ADD", without(GOOD_ENV, "CNI_NETNS"), json.dumps(GOOD_CONF), 4,
     "CNI_NETNS"),
    ("stdin not JSON", GOOD_ENV, '{"cniVersion": "1.0.0", ', 6, "not valid JSON"),
    ("stdin not an object", GOOD_ENV, "[1, 2]", 6, "not a JSON object"),
    ("unknown cniVersion", GOOD_ENV, json.dumps(dict(GOOD_CONF, cniVersion="9.9.9")), 1,
     "incompatible CNI version 9.9.9"),
    ("no cniVersion", GOOD_ENV, json.dumps(without(GOOD_CONF, "cniVersion")), 7,
     "no cniVersion"),
    ("no prevResult on ADD", GOOD_ENV, json.dumps(without(GOOD_CONF, "prevResult")), 7,
     "prevResult"),
    ("no prevResult on CHECK", dict(GOOD_ENV, CNI_COMMAND="CHECK"),
     json.dumps(without(GOOD_CONF, "prevResult")), 7, "prevResult"),
    ("unknown CNI_COMMAND", dict(GOOD_ENV, CNI_COMMAND="FROB"), json.dumps(GOOD_CONF), 4,
     "unknown CNI_COMMAND 'FROB'"),
    ("no CNI_COMMAND", without(GOOD_ENV, "CNI_COMMAND"), json.dumps(GOOD_CONF), 4,
     "CNI_COMMAND is not set"),
    ("no CNI_CONTAINERID", without(GOOD_ENV, "CNI_CONTAINERID"), json.dumps(GOOD_CONF), 4,
     "CNI_CONTAINERID"),
    ("no pod name in CNI_ARGS", dict(GOOD_ENV, CNI_ARGS="IgnoreUnknown=1"),
     json.dumps(GOOD_CONF), 4, "K8S_POD_NAME"),
    ("bad failOpen", GOOD_ENV, json.dumps(dict(GOOD_CONF, failOpen="yes")), 7, "failOpen"),
    ("prevResult without IPs", GOOD_ENV, json.dumps(dict(GOOD_CONF, prevResult={})), 7,
     "no IP address"),
])
def test_bad_input_gives_its_cni_error(case: str, env: dict[str, str], stdin: str, code: int,
                                       says: str):
    run = run_plugin(env, stdin)
    error = cni_error(run)
    assert error["code"] == code, (case, error)
    assert says in error["msg"], (case, error)
    assert error["cniVersion"] == "1.0.0"
    assert says in run.stderr  # also logged for the runtime's log


def test_version_lists_the_supported_versions():
    run = run_plugin({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert run.returncode == 0
    assert run.json() == {"cniVersion": "1.0.0",
                          "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_error_json_speaks_the_requested_version():
    conf = dict(GOOD_CONF, cniVersion="0.4.0")
    error = cni_error(run_plugin(without(GOOD_ENV, "CNI_NETNS"), json.dumps(conf)))
    assert error["cniVersion"] == "0.4.0" and error["code"] == 4
