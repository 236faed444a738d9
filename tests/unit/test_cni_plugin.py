"""nodeproxy-cni's parts without a kernel: CNI_ARGS, netconf, the pod's cgroup, the installer."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from nodeproxy.cni import conflist, install, netconf, pod
from nodeproxy.cni.spec import CniError, parse_cni_args

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def conf(**extra: object) -> netconf.NetConf:
    return netconf.parse({"cniVersion": "1.0.0", "name": "k8s", **extra})


def test_cni_args_are_parsed_and_malformed_ones_refused():
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;;K8S_POD_NAMESPACE=shop") == {
        "IgnoreUnknown": "1", "K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "shop"}
    with pytest.raises(CniError) as e:
        parse_cni_args("K8S_POD_NAME")
    assert e.value.code == 4


def test_netconf_defaults_and_type_errors():
    c = conf()
    assert c.control_socket == "/run/nodeproxy/control.sock" and c.fail_open is False
    assert c.timeout_seconds == 30.0 and c.prev_result is None
    for bad in ({"failOpen": 1}, {"timeoutSeconds": 0}, {"excludeNamespaces": "x"},
                {"controlSocket": 5}, {"args": {"cni": []}}, {"prevResult": []}):
        with pytest.raises(CniError) as e:
            conf(**bad)
        assert e.value.code == 7, bad


def test_identity_from_hints_then_cni_args_then_defaults():
    args = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-1", "K8S_POD_UID": UID,
            "NODEPROXY_LABELS": "app:web,nodeproxy.io/dataplane-mode:none",
            "NODEPROXY_SERVICE_ACCOUNT": "web-sa"}
    info = pod.pod_info(conf(), args)
    assert (info.key, info.service_account, info.uid) == ("shop/web-1", "web-sa", UID)
    assert info.labels == {"app": "web", "nodeproxy.io/dataplane-mode": "none"}
    assert pod.skip_reason(conf(), info) == "label nodeproxy.io/dataplane-mode=none"
    hinted = pod.pod_info(conf(args={"cni": {"labels": {"app": "x"}, "serviceAccount": "s"}}),
                          args)
    assert (hinted.labels, hinted.service_account) == ({"app": "x"}, "s")
    assert pod.skip_reason(conf(), hinted) is None
    plain = pod.pod_info(conf(), {"K8S_POD_NAMESPACE": "kube-system", "K8S_POD_NAME": "dns"})
    assert (plain.service_account, plain.labels) == ("default", {})
    assert pod.skip_reason(conf(excludeNamespaces=["kube-system"]), plain) is not None


def test_kubernetes_lookup_hook_fills_what_hints_leave(monkeypatch: pytest.MonkeyPatch):
    from nodeproxy.cni import kubeapi

    monkeypatch.setattr(kubeapi, "LOOKUP_POD", lambda ns, name: kubeapi.PodMetadata(
        service_account="from-api", labels={"app": "api"}))
    info = pod.pod_info(conf(), {"K8S_POD_NAMESPACE": "a", "K8S_POD_NAME": "b"})
    assert (info.service_account, info.labels) == ("from-api", {"app": "api"})


@pytest.mark.parametrize("layout", [
    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice",
    "kubepods.slice/kubepods-pod{u}.slice",
    "kubepods/burstable/pod{uid}",
    "kubepods/pod{uid}",
])
def test_pod_cgroup_found_from_the_pod_uid(tmp_path: Path, layout: str):
    """The kubelet's pod cgroup, systemd (uid with '_') and cgroupfs drivers."""
    path = tmp_path / layout.format(u=UID.replace("-", "_"), uid=UID)
    path.mkdir(parents=True)
    (tmp_path / "kubepods.slice" / "kubepods-podffff.slice").mkdir(parents=True, exist_ok=True)
    info = pod.pod_info(conf(cgroupRoot=str(tmp_path)),
                        {"K8S_POD_NAMESPACE": "a", "K8S_POD_NAME": "b", "K8S_POD_UID": UID})
    assert pod.pod_cgroup(conf(cgroupRoot=str(tmp_path)), info) == str(path)


def test_pod_cgroup_hint_wins_and_unknown_cgroup_is_an_error(tmp_path: Path):
    args = {"K8S_POD_NAMESPACE": "a", "K8S_POD_NAME": "b", "K8S_POD_UID": UID}
    c = conf(cgroupRoot=str(tmp_path))
    with pytest.raises(CniError) as e:
        pod.pod_cgroup(c, pod.pod_info(c, args))
    assert e.value.code == 102 and UID in e.value.details
    hinted = pod.pod_info(c, {**args, "NODEPROXY_CGROUP": "/sys/fs/cgroup/x"})
    assert pod.pod_cgroup(c, hinted) == "/sys/fs/cgroup/x"


def test_result_ips_drop_the_prefix_length():
    prev = {"ips": [{"address": "10.244.0.5/24"}, {"address": "fd00::5/64"}, {"x": 1}]}
    assert pod.result_ips(prev) == ["10.244.0.5", "fd00::5"]


# ---------------------------------------------------------------------------
# Installer: binary and chained config

PRIMARY = {"cniVersion": "1.0.0", "name": "k8s-pod-network",
           "plugins": [{"type": "bridge", "bridge": "cni0",
                        "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}},
                       {"type": "portmap", "capabilities": {"portMappings": True}}]}


def test_insert_chains_last_and_is_idempotent(tmp_path: Path):
    (tmp_path / "10-k8s.conflist").write_text(json.dumps(PRIMARY))
    (tmp_path / "99-other.conflist").write_text("untouched")
    entry = install.plugin_entry(exclude_namespaces=["kube-system"])
    path, changed = conflist.insert(tmp_path, entry)
    assert path == tmp_path / "10-k8s.conflist" and changed
    data = json.loads(path.read_text())
    assert data["plugins"][:2] == PRIMARY["plugins"]
    assert data["plugins"][2] == entry and entry["type"] == "nodeproxy-cni"
    before = path.read_text()
    assert conflist.insert(tmp_path, entry) == (path, False)
    assert path.read_text() == before
    # A changed setting replaces the entry instead of adding a second one.
    conflist.insert(tmp_path, install.plugin_entry(fail_open=True))
    plugins = json.loads(path.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "portmap", "nodeproxy-cni"]
    assert plugins[-1]["failOpen"] is True
    assert (tmp_path / "99-other.conflist").read_text() == "untouched"


def test_insert_turns_a_single_plugin_conf_into_a_conflist(tmp_path: Path):
    single = {"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "br0"}
    (tmp_path / "10-mynet.conf").write_text(json.dumps(single))
    os.chmod(tmp_path / "10-mynet.conf", 0o600)
    path, _ = conflist.insert(tmp_path, install.plugin_entry())
    assert path == tmp_path / "10-mynet.conflist" and not (tmp_path / "10-mynet.conf").exists()
    data = json.loads(path.read_text())
    assert (data["cniVersion"], data["name"]) == ("0.4.0", "mynet")
    assert data["plugins"][0] == {"type": "bridge", "bridge": "br0"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_insert_without_a_primary_config_fails_clearly(tmp_path: Path):
    with pytest.raises(conflist.ConfigDirError, match="primary CNI plugin"):
        conflist.insert(tmp_path, install.plugin_entry())
    assert install.main(["--bin-dir", str(tmp_path / "bin"), "--conf-dir",
                         str(tmp_path / "none")]) == 1


def test_installed_binary_is_a_marked_zipapp_the_system_python_runs(tmp_path: Path):
    binary, changed = install.install_zipapp(tmp_path, interpreter="/usr/bin/python3")
    assert changed and install.installed_by_us(binary)
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert install.install_zipapp(tmp_path, interpreter="/usr/bin/python3") == (binary, False)
    # The node's python, isolated from this venv and from the source tree.
    out = subprocess.run([str(binary)], input='{"cniVersion": "1.0.0"}', capture_output=True,
                         text=True, env={"CNI_COMMAND": "VERSION"}, cwd=tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["supportedVersions"][-1] == "1.0.0"
    other = tmp_path / "elsewhere"
    other.write_text("#!/bin/sh\n")
    assert not install.installed_by_us(other)
