"""The manifest -> `podman run` translation the image test starts containers with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nodeproxy_dev.testbed import podman
from nodeproxy_dev.testbed.podman import ManifestError, Volume

MANIFEST = Path(__file__).resolve().parents[2] / "config" / "k8s" / "daemonset.yaml"
POD = yaml.safe_load(MANIFEST.read_text())["spec"]["template"]["spec"]
VOLUMES = {v["name"]: Volume(f"/stand-in/{v['name']}") for v in POD["volumes"]}
FIELDS = {"spec.nodeName": "node7", "metadata.namespace": "nodeproxy-system"}


def argv_of(container: dict, **kw) -> list[str]:
    args = dict(image="nodeproxy:0.1.0", name="c", volumes=VOLUMES, fields=FIELDS,
                network="/run/netns/node7")
    args.update(kw)
    return podman.container_argv(container, POD, **args)


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_daemon_container_gets_the_manifest_s_settings():
    daemon = POD["containers"][0]
    argv = argv_of(daemon, machine=["--runtime", "runc"])
    assert argv[:5] == ["run", "--name", "c", "--runtime", "runc"]
    assert pairs(argv, "--network") == ["ns:/run/netns/node7"]
    assert "--pid" not in argv  # hostPID: false
    assert pairs(argv, "--env") == ["NODE_NAME=node7", "POD_NAMESPACE=nodeproxy-system"]
    assert pairs(argv, "--cap-drop") == ["all"]
    assert pairs(argv, "--cap-add") == ["bpf", "net_admin", "sys_admin"]
    assert "--privileged" not in argv
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert "no-new-privileges" in pairs(argv, "--security-opt")
    assert "apparmor=unconfined" in pairs(argv, "--security-opt")
    assert pairs(argv, "--user") == ["0"]
    volumes = pairs(argv, "--volume")
    assert "/stand-in/bpffs:/sys/fs/bpf:rw,rbind,rslave" in volumes
    assert "/stand-in/netns:/var/run/netns:ro,rbind,rslave" in volumes
    assert "/stand-in/usr-src:/usr/src:ro,rbind" in volumes
    assert pairs(argv, "--memory") == [str(1 << 30)]
    assert pairs(argv, "--cpus") == ["2.0"]
    assert pairs(argv, "--stop-timeout") == ["45"]
    entry = pairs(argv, "--entrypoint")
    assert json.loads(entry[0]) == ["/bin/sh", "-c"]
    image_at = argv.index("nodeproxy:0.1.0")
    assert argv[image_at + 1:] == daemon["args"]


def test_memory_emptydir_is_a_tmpfs_and_bidirectional_is_rshared():
    volumes = dict(VOLUMES, tmp=Volume("", tmpfs_size=str(256 << 20)))
    argv = argv_of(POD["containers"][0], volumes=volumes)
    assert pairs(argv, "--tmpfs") == [f"/tmp:rw,size={256 << 20}"]
    mount_bpffs = POD["initContainers"][0]
    argv = argv_of(mount_bpffs)
    assert "--privileged" in argv
    assert pairs(argv, "--volume") == ["/stand-in/bpffs:/sys/fs/bpf:rw,rbind,rshared"]


@pytest.mark.parametrize(("change", "says"), [
    (lambda c: c["securityContext"].update(seLinuxOptions={}), "seLinuxOptions"),
    (lambda c: c.update(workingDir="/x"), "workingDir"),
    (lambda c: c["volumeMounts"][0].update(subPath="x"), "subPath"),
    (lambda c: c["volumeMounts"].append({"name": "nope", "mountPath": "/x"}), "nope"),
    (lambda c: c["env"].append({"name": "X", "valueFrom": {"fieldRef": {
        "fieldPath": "status.podIP"}}}), "X"),
    (lambda c: c["securityContext"].update(seccompProfile={"type": "Localhost"}), "Localhost"),
])
def test_what_the_translation_does_not_know_is_an_error(change, says: str):
    daemon = yaml.safe_load(MANIFEST.read_text())["spec"]["template"]["spec"]["containers"][0]
    change(daemon)
    with pytest.raises(ManifestError, match=says):
        argv_of(daemon)


@pytest.mark.parametrize(("quantity", "value"), [
    ("256Mi", 256 << 20), ("1Gi", 1 << 30), ("64M", 64_000_000), ("1000", 1000)])
def test_memory_quantities(quantity: str, value: int):
    assert podman.memory_bytes(quantity) == value


def test_cpu_quantities():
    assert podman.cpus("2") == 2.0 and podman.cpus("100m") == 0.1 and podman.cpus(1) == 1.0
