"""The DaemonSet's image (Containerfile, `make image`), run as config/k8s/daemonset.yaml says.

The pod template is read from the manifest itself: its init containers run in
order (mount-bpffs, privileged; install-cni), then the daemon container, each
with the manifest's command, args, env, securityContext, volumeMounts,
resources and grace period (nodeproxy_dev.testbed.podman), on a simulated node of
the testbed.  The node's "host" is the machine, except where the manifest's
host paths would touch it: hostNetwork is the node's netns; /sys/fs/bpf,
/run/nodeproxy, /etc/cni/net.d and /opt/cni/bin are directories of this test;
the machine's own paths are mounted only where the manifest mounts them
read-only (cgroups, netns files, /lib/modules, /usr/src: bcc compiles against
the node's kernel headers there).  The ConfigMap's node.yaml is the testbed
node's policy with the manifest's in-container paths; the root ConfigMap is the run's
root certificate alone: as the manifest says, the daemon holds no CA key and gets its
pods' certificates from the signing service (`nodeproxy ca serve`, a process in the
node's netns holding the run's intermediate), authenticated by the projected token,
which the suite's stand-in Kubernetes API (tests/integration/fake_kube_api.py, its
documented TokenReview protocol) issued and reviews.

Podman uses a container store of the test's own: the image it loads, its
containers and their cgroups are removed at the end, also on failure.

The image is build/nodeproxy-image.tar (or $NODEPROXY_IMAGE_ARCHIVE); when it is
missing, scripts/build-image.sh (`make image`) builds it first (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeproxy.cni import install
from nodeproxy_dev.testbed import cni, netns
from nodeproxy_dev.testbed.cluster import REPO_ROOT, Cluster
from nodeproxy_dev.testbed.podman import Podman, Volume, container_argv, machine_argv, memory_bytes
from nodeproxy_dev.testbed.signer_process import signer_argv
from tests.integration import fake_kube_api as kube
from tests.integration.probes import connect
from tests.integration.test_cni import Chain, k8s_args, new_sandbox

MANIFEST = Path(REPO_ROOT, "config", "k8s", "daemonset.yaml")
ARCHIVE = Path(os.environ.get("NODEPROXY_IMAGE_ARCHIVE")
               or os.path.join(REPO_ROOT, "build", "nodeproxy-image.tar"))
PORT = 7000
# The manifest's host paths that a test run must not write on this machine: each
# gets a directory of the test.
STAND_INS = {"/sys/fs/bpf": "bpffs", "/run/nodeproxy": "run", "/etc/cni/net.d": "net.d",
             "/opt/cni/bin": "cni-bin"}
# Where the manifest's containers see the volumes (configmap.yaml's paths).
IN_CONTAINER = {"node": {"bpffs": "/sys/fs/bpf", "stateDir": "/run/nodeproxy"},
                "admin": {"controlSocket": "/run/nodeproxy/control.sock"},
                "identity": {"caCert": "/etc/nodeproxy/ca/root-cert.pem", "caKey": None,
                             "signer": {"address": "https://127.0.0.1:15012",
                                        "serverName": "nodeproxy-ca.test",
                                        "tokenPath": "/var/run/secrets/nodeproxy/token",
                                        "retrySeconds": 1}},
                # As configmap.yaml: the probe SNAT chain, written from inside the
                # container (its capabilities, its read-only root, its iptables).
                "inbound": {"probeSources": [], "probeSnat": {}}}
SIGNER_LISTEN = "127.0.0.1:15012"   # in node0's netns, where the daemon container runs
SIGNER_AUDIENCE = "nodeproxy-ca"    # the manifest's projected token's audience


@dataclass
class Deployment:
    """The simulated node with the manifest's pod running on it."""

    cluster: Cluster
    podman: Podman
    pod_spec: dict[str, Any]
    host: Path            # the test's stand-ins for the node's host paths
    daemon: str           # the daemon container's name
    ready_seconds: float  # `podman run` of the daemon to its startup probe's first 200
    init_output: dict[str, str]

    def stand_in(self, host_path: str) -> Path:
        return self.host / STAND_INS[host_path]

    def probe(self, probe: dict[str, Any]) -> int:
        node = self.cluster.nodes["node0"]
        get = probe["httpGet"]
        try:
            return netns.http_get(node.netns_path,
                                  f"http://127.0.0.1:{get['port']}{get['path']}", 2.0)[0]
        except OSError:
            return 0

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.pod_spec["containers"] if c["name"] == name)


def build_image() -> None:
    build = subprocess.run(["bash", "scripts/build-image.sh"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]


def volumes_for(pod_spec: dict[str, Any], host: Path, policy: Path, ca: Path,
                token: Path) -> dict[str, Volume]:
    """Each pod volume's source here; a machine path only where every mount is read-only."""
    mounts = [m for c in (*pod_spec["initContainers"], *pod_spec["containers"])
              for m in c.get("volumeMounts", [])]
    volumes = {}
    for volume in pod_spec["volumes"]:
        name = volume["name"]
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if path in STAND_INS:
                source = host / STAND_INS[path]
                source.mkdir(exist_ok=True)
                volumes[name] = Volume(str(source))
                continue
            writers = [m["mountPath"] for m in mounts if m["name"] == name
                       and not m.get("readOnly")]
            assert not writers, f"hostPath {path} is mounted writable; give it a stand-in"
            volumes[name] = Volume(path)
        elif "configMap" in volume:
            config_map = volume["configMap"]["name"]
            assert config_map in ("nodeproxy-policy", "nodeproxy-ca-root"), config_map
            volumes[name] = Volume(str(policy if config_map == "nodeproxy-policy" else ca))
        elif "projected" in volume:
            sources = volume["projected"]["sources"]
            assert [sorted(src) for src in sources] == [["serviceAccountToken"]], sources
            assert sources[0]["serviceAccountToken"]["audience"] == SIGNER_AUDIENCE
            volumes[name] = Volume(str(token))
        elif volume.get("emptyDir", {}).get("medium") == "Memory":
            limit = volume["emptyDir"].get("sizeLimit", "64Mi")
            volumes[name] = Volume("", tmpfs_size=str(memory_bytes(limit)))
        elif "emptyDir" in volume:
            source = host / f"empty-{name}"
            source.mkdir()
            volumes[name] = Volume(str(source))
        else:
            raise AssertionError(f"volume {name}: unknown kind {sorted(volume)}")
    return volumes


def cgroup_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def remove_cgroup_tree(relative: str) -> None:
    """rmdir the cgroup (and its children) in every hierarchy runc created it in."""
    for mount in cgroup_mounts():
        top = Path(mount, relative.lstrip("/"))
        if top.is_dir():
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()),
                                    key=lambda p: len(p.parts), reverse=True):
                directory.rmdir()
            top.rmdir()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not ARCHIVE.exists():
        build_image()
    manifest = yaml.safe_load(MANIFEST.read_text())
    pod_spec = manifest["spec"]["template"]["spec"]
    fields = {"spec.nodeName": "node0", "metadata.namespace": manifest["metadata"]["namespace"]}
    work = tmp_path_factory.mktemp("image")
    host, policy, ca, token = work / "host", work / "policy", work / "ca", work / "token"
    for directory in (host, policy, ca, token):
        directory.mkdir()
    podman = Podman(work / "store")
    names: list[str] = []
    signer: subprocess.Popen[bytes] | None = None
    api: kube.ApiThread | None = None
    with Cluster(1) as c:
        cgroup_parent = f"/{c.name('podman')}"
        bpffs = host / STAND_INS["/sys/fs/bpf"]
        try:
            c.add_pod("node0", "web-0", labels={"app": "web"})
            c.add_pod("node0", "client-0", labels={"app": "client"})
            c.add_service("web", port=80, target_port=PORT)
            c.serve_peer("web-0", PORT)
            node = c.nodes["node0"]
            # The ConfigMap: this node's policy with the manifest's paths, named
            # this-node as configmap.yaml has it (the container's sed renames it).
            c.write_configs(overrides=IN_CONTAINER)
            document = dict(node.config, node=dict(node.config["node"], name="this-node"))
            (policy / "node.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
            # The root ConfigMap: the certificate, no key.
            shutil.copy(os.path.join(c.dir, "ca", "root-cert.pem"), ca / "root-cert.pem")
            # The API the signer asks: the daemon's own pod (its token is bound to it)
            # and the workloads on node0, then the signer.
            api = kube.ApiThread.in_netns(node.netns_path)
            agent = kube.pod("nodeproxy-node0", "nodeproxy-system", node="node0",
                             sa="nodeproxy", host_network=True)
            api.do(api.api.put, "pods", agent)
            for name in ("web-0", "client-0"):
                api.do(api.api.put, "pods", kube.pod(name, node="node0",
                                                     ip=c.pods[name].ip4))
            (token / "token").write_text(api.do(
                api.api.issue_token, "token-node0", namespace="nodeproxy-system",
                service_account="nodeproxy", pod_name="nodeproxy-node0",
                pod_uid=agent["metadata"]["uid"], audiences=[SIGNER_AUDIENCE]))
            with open(work / "signer.log", "wb") as signer_log:
                signer = c.spawn_in_node("node0", signer_argv(
                    c.python, os.path.join(c.dir, "ca"), trust_domain=c.trust_domain,
                    listen=SIGNER_LISTEN, kube_api=api.url, dns_name="nodeproxy-ca.test",
                    audience=SIGNER_AUDIENCE), stdout=signer_log, stderr=subprocess.STDOUT)
            volumes = volumes_for(pod_spec, host, policy, ca, token)
            # Bidirectional propagation needs a shared mount at the source.
            subprocess.run(["mount", "--bind", str(bpffs), str(bpffs)], check=True)
            subprocess.run(["mount", "--make-shared", str(bpffs)], check=True)
            # The primary CNI plugin's configuration, which install-cni chains into.
            net_d = host / STAND_INS["/etc/cni/net.d"]
            (net_d / "10-testbed.conflist").write_text(json.dumps(node.network.conflist()))
            image = podman.load(ARCHIVE)
            assert image.endswith(pod_spec["containers"][0]["image"]), image
            machine = machine_argv(cgroup_parent)

            def argv(container: dict[str, Any]) -> list[str]:
                name = c.name(container["name"])
                names.append(name)
                spec = dict(container)
                # Node paths in args (the control socket the plugin dials) are the
                # stand-ins', as the node would see them.
                spec["args"] = [on_stand_ins(a, host) for a in container.get("args", [])]
                return container_argv(spec, pod_spec, image=image, name=name,
                                      volumes=volumes, fields=fields,
                                      network=node.netns_path, machine=machine)

            init_output = {}
            for container in pod_spec["initContainers"]:
                run = podman.run(argv(container), timeout=300, check=False)
                assert run.returncode == 0, (container["name"], run.stdout, run.stderr)
                init_output[container["name"]] = run.stdout + run.stderr
                podman.remove(names[-1])

            daemon_spec = pod_spec["containers"][0]
            run_argv = argv(daemon_spec)
            run_argv.insert(1, "--detach")
            started = time.monotonic()
            podman.run(run_argv, timeout=120)
            deployment = Deployment(c, podman, pod_spec, host, names[-1], 0.0, init_output)
            probe = daemon_spec["startupProbe"]
            # The manifest allows periodSeconds x failureThreshold; a busy 2-core
            # machine gets three times that.
            deadline = started + 3 * probe["periodSeconds"] * probe["failureThreshold"]
            while deployment.probe(probe) != 200:
                state = podman.run(["inspect", "--format", "{{.State.Status}}", names[-1]],
                                   check=False).stdout.strip()
                assert state == "running", f"daemon {state}:\n{podman.logs(names[-1])}"
                assert time.monotonic() < deadline, f"not ready:\n{podman.logs(names[-1])}"
                time.sleep(0.1)
            deployment.ready_seconds = time.monotonic() - started
            print(f"\nimage: daemon container start to startup probe 200: "
                  f"{deployment.ready_seconds:.1f} s")
            yield deployment
        finally:
            for name in reversed(names):
                podman.remove(name)
            if signer is not None:
                signer.terminate()
                signer.wait(10)
            if api is not None:
                api.close()
            podman.reset()
            # The bpffs mount-bpffs made sits on the shared bind mount: both go.
            for _ in range(4):
                if subprocess.run(["umount", "--recursive", "--lazy", str(bpffs)],
                                  capture_output=True).returncode != 0:
                    break
            remove_cgroup_tree(cgroup_parent)
            shutil.rmtree(work, ignore_errors=True)


def on_stand_ins(arg: str, host: Path) -> str:
    """A container argument naming a node path (``--control-socket=/run/nodeproxy/...``)
    with this test's stand-in for that path; paths inside the container (/host/...) stay."""
    key, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    for node_path, stand_in in STAND_INS.items():
        if value == node_path or value.startswith(node_path + "/"):
            return f"{key}{sep}{host / stand_in}{value[len(node_path):]}"
    return arg


def diagnosis(d: Deployment) -> str:
    """The daemon's log tail and what it has enrolled, for a failing assertion."""
    try:
        pods = json.dumps(d.cluster.admin_json("node0", "/pods"))[:3000]
    except Exception as e:  # noqa: BLE001 - a diagnosis never raises
        pods = repr(e)
    text = f"pods: {pods}\nlog:\n{d.podman.logs(d.daemon)}"
    print(text)  # whole, where pytest's assertion message would cut it
    return text


def daemon_pid(d: Deployment) -> int:
    return int(d.podman.run(["inspect", "--format", "{{.State.Pid}}", d.daemon]).stdout)


# ---------------------------------------------------------------------------


@pytest.mark.privileged
def test_init_containers_mount_bpffs_and_install_the_static_plugin(deployment: Deployment):
    d = deployment
    # mount-bpffs mounted bpffs for the "host" (Bidirectional propagation).
    bpffs = str(d.stand_in("/sys/fs/bpf"))
    with open("/proc/mounts") as f:
        assert any(line.split()[1:3] == [bpffs, "bpf"] for line in f), bpffs
    # install-cni copied the image's self-contained executable and chained it.
    binary = d.stand_in("/opt/cni/bin") / "nodeproxy-cni"
    assert install.installed_by_us(binary) and install.elf_section(
        binary, install.ELF_MARKER_SECTION) is not None
    assert os.access(binary, os.X_OK)
    assert "installed:" in d.init_output["install-cni"], d.init_output
    plugins = json.loads((d.stand_in("/etc/cni/net.d") / "10-testbed.conflist").read_text())
    ours = plugins["plugins"][-1]
    assert ours["type"] == "nodeproxy-cni"
    assert ours["controlSocket"] == str(d.stand_in("/run/nodeproxy") / "control.sock")
    assert ours["excludeNamespaces"] == ["kube-system", "nodeproxy-system"]


@pytest.mark.privileged
def test_the_daemon_runs_with_exactly_the_manifest_s_privileges(deployment: Deployment):
    d = deployment
    pid = daemon_pid(d)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"run" in cmdline and b"/etc/nodeproxy/rendered/node.yaml" in cmdline, cmdline
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    effective = int(status["CapEff"], 16)
    # CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_BPF 39: nothing else.
    assert effective == (1 << 12) | (1 << 21) | (1 << 39), hex(effective)
    assert status["NoNewPrivs"].strip() == "1"
    inspect = json.loads(d.podman.run(["inspect", d.daemon]).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    # The container's sed named the node after NODE_NAME.
    rendered = yaml.safe_load(Path(d.host, "empty-rendered", "node.yaml").read_text())
    assert rendered["node"]["name"] == "node0"
    # It serves the probes the manifest declares.
    container = d.container("nodeproxy")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert d.probe(container[probe]) == 200, probe
    # Its programs and maps are pinned on the node's bpffs (the host's, via the mount).
    pins = d.stand_in("/sys/fs/bpf") / "nodeproxy" / "node0"
    assert (pins / "maps").is_dir() and any((pins / "maps").iterdir()), pins


@pytest.mark.privileged
def test_service_traffic_from_a_pod_flows_through_the_containerized_daemon(
        deployment: Deployment):
    c = deployment.cluster
    vip = c.services["default/web"].vip4
    # The VIP is unreachable on the node: only capture by the daemon gets here, and
    # the server sees the client pod's own address.
    answer = connect(c, "client-0", vip, 80)
    assert answer.startswith("connected") and c.pods["client-0"].ip4 in answer, (
        answer, diagnosis(deployment))
    result = c.peer("client-0", "transfer", "--to", f"{vip}:80", "--send", "1MiB",
                    "--receive", "1MiB", "--connections", "4", "--timeout", "60",
                    timeout=180)
    # The peer checks the SHA-256 of every byte both ways.
    assert result["ok"] and result["exit_code"] == 0, result
    assert result["failed"] == 0 and result["sha_mismatch"] == 0, result
    assert result["sent"] == result["received"] == 4 << 20, result


@pytest.mark.privileged
def test_a_pod_added_through_the_installed_chain_is_enrolled(deployment: Deployment,
                                                            tmp_path: Path):
    """The conflist install-cni wrote, with the binary it copied, run as a runtime runs it
    for a new pod: the containerized daemon enrolls it, and releases it on DEL."""
    d = deployment
    c = d.cluster
    cni_path = tmp_path / "cni-path"
    cni_path.mkdir()
    for plugin in Path(cni.DEFAULT_PLUGIN_DIR).iterdir():
        (cni_path / plugin.name).symlink_to(plugin)
    (cni_path / "nodeproxy-cni").symlink_to(d.stand_in("/opt/cni/bin") / "nodeproxy-cni")
    conflist = json.loads((d.stand_in("/etc/cni/net.d") / "10-testbed.conflist").read_text())
    ch = Chain(c.nodes["node0"].netns_path, str(cni_path), conflist)
    pod = new_sandbox(c, "cni-image")
    args = k8s_args(pod)
    result, runs = ch.add(pod.netns, pod.netns_path, args)
    pod.cni_result, pod.ips = result, cni.result_ips(result)
    assert runs[-1].plugin == "nodeproxy-cni" and runs[-1].json() == runs[-2].json()
    listed = {f"{p['namespace']}/{p['name']}" for p in c.admin_json("node0", "/pods")}
    assert pod.key in listed
    answer = connect(c, pod.name, c.services["default/web"].vip4, 80)
    assert answer.startswith("connected") and pod.ip4 in answer, answer
    assert all(r.returncode == 0 for r in ch.delete(pod.netns, pod.netns_path, args, result))
    listed = {f"{p['namespace']}/{p['name']}" for p in c.admin_json("node0", "/pods")}
    assert pod.key not in listed
    c.remove_pod(pod.name)


def _probe_snat_chain(c: Cluster) -> list[str] | None:
    out = c.run_in_node("node0", ["iptables-save", "-t", "nat"])
    assert out.returncode == 0, out.stderr
    if ":NODEPROXY_PROBE_SNAT - [0:0]" not in out.stdout.splitlines():
        return None
    return [line for line in out.stdout.splitlines()
            if line.startswith("-A NODEPROXY_PROBE_SNAT ")]


@pytest.mark.privileged
def test_the_containerized_daemon_gives_probes_their_own_address(deployment: Deployment):
    """configmap.yaml's inbound.probeSnat works with the manifest's privileges: the node's
    chain names every enrolled pod, and a probe to a port nothing listens on is refused
    by the pod itself (not accepted by the proxy)."""
    c = deployment.cluster
    rules = _probe_snat_chain(c)
    assert rules is not None, diagnosis(deployment)
    for name in ("web-0", "client-0"):
        assert any(f"-d {c.pods[name].ip4}/32 " in rule for rule in rules), (rules, name)
    try:
        netns.connect(c.nodes["node0"].netns_path, c.pods["web-0"].ip4, PORT + 1).close()
        outcome = "connected"
    except OSError as e:
        outcome = type(e).__name__
    assert outcome == "ConnectionRefusedError", outcome


@pytest.mark.privileged
def test_sigterm_drains_and_the_daemon_exits_cleanly(deployment: Deployment):
    d = deployment
    grace = d.pod_spec["terminationGracePeriodSeconds"]
    started = time.monotonic()
    d.podman.run(["stop", "--time", str(grace), d.daemon], timeout=grace + 60)
    stopped = time.monotonic() - started
    code = d.podman.run(["inspect", "--format", "{{.State.ExitCode}}", d.daemon]).stdout
    assert int(code) == 0, d.podman.logs(d.daemon)
    assert stopped < grace, stopped  # by itself, not by SIGKILL at the end of the grace
    assert _probe_snat_chain(d.cluster) is None  # nothing left in the node's nat table
