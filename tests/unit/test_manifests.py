"""config/k8s: schema-valid for the Kubernetes versions the README claims, and saying what it says.

Schemas: ``kubernetes-validate`` (PyPI) ships the Kubernetes OpenAPI schemas as
JSON Schema and validates offline; strict mode refuses unknown fields too.
What the schemas cannot express (the API server's own rules, the policy inside
the ConfigMap, RBAC scope, capabilities) is checked here directly.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from nodeproxy.cli import uninstall
from nodeproxy.cni import install
from nodeproxy.config.loader import parse_config

K8S = Path(__file__).resolve().parents[2] / "config" / "k8s"
KUBERNETES_VERSIONS = ["1.35", "1.36", "1.37"]
CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_ADMIN"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(kind: str, name: str, directory: Path = K8S) -> dict[str, Any]:
    for path in sorted(directory.glob("*.yaml")):
        for doc in docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {directory}")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = find("DaemonSet", "nodeproxy")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    return next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == name)


def node_policy(directory: Path = K8S) -> str:
    text: str = find("ConfigMap", "nodeproxy-policy", directory)["data"]["node.yaml"]
    return text


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str):
    found = docs(path)
    assert found, f"{path} holds no manifest"
    for doc in found:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not valid "
                        f"Kubernetes {version}: {where}: {e.message}")


def test_the_validator_is_offline_and_really_refuses_bad_manifests():
    assert {f"{v}.0" for v in KUBERNETES_VERSIONS} <= set(kv.all_versions())
    broken = find("DaemonSet", "nodeproxy")
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", [K8S, K8S / "example-app"], ids=["base", "example-app"])
def test_kustomization_lists_every_manifest(directory: Path):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("directory", [K8S, K8S / "example-app"], ids=["base", "example-app"])
def test_kustomize_builds(directory: Path):
    """kubectl's built-in kustomize renders it (`make setup` installs kubectl)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make setup` installs it"
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in built:
        kv.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    if directory == K8S:
        kinds = sorted(d["kind"] for d in built)
        assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole",
                                "ClusterRoleBinding", "ConfigMap", "Secret", "DaemonSet",
                                "ConfigMap", "ServiceAccount", "ClusterRole",
                                "ClusterRoleBinding", "Deployment", "Service"])


def test_node_policy_in_the_configmap_is_a_valid_config():
    config = parse_config(node_policy(), "configmap.yaml:node.yaml").config
    assert config.node.name == "this-node"
    assert config.admin.control_socket == "/run/nodeproxy/control.sock"
    assert config.admin.metrics_port == 15020 and config.admin.readiness_port == 15021


def render(tmp_path: Path, node_name: str, extra_keys: dict[str, str] | None = None) -> str:
    """Run the daemon container's own start script, with `nodeproxy run` replaced by cat."""
    script = container("nodeproxy")["args"][0]
    policy, rendered = tmp_path / "policy", tmp_path / "rendered"
    policy.mkdir()
    rendered.mkdir()
    (policy / "node.yaml").write_text(node_policy())
    for key, text in (extra_keys or {}).items():
        (policy / key).write_text(text)
    script = (script.replace("/etc/nodeproxy/policy", str(policy))
              .replace("/etc/nodeproxy/rendered", str(rendered))
              .replace("exec nodeproxy run --config", "exec cat"))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                         env={"NODE_NAME": node_name, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_container_names_the_policy_after_its_node(tmp_path: Path):
    config = parse_config(render(tmp_path, "worker-1")).config
    assert config.node.name == "worker-1"
    assert config.proxy.drain_seconds == parse_config(node_policy()).config.proxy.drain_seconds


def test_a_per_node_key_overrides_the_shared_policy(tmp_path: Path):
    own = node_policy().replace("outboundPolicy: ALLOW_ANY", "outboundPolicy: REGISTRY_ONLY")
    config = parse_config(render(tmp_path, "gpu-7", {"node-gpu-7.yaml": own})).config
    assert config.node.name == "gpu-7" and config.mesh.outbound_policy == "REGISTRY_ONLY"


def test_cluster_role_reads_exactly_what_discovery_needs():
    rules = find("ClusterRole", "nodeproxy")["rules"]
    granted = {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    wanted = {(group, resource, verb)
              for group, resource in (("", "pods"), ("", "services"), ("", "namespaces"),
                                      ("discovery.k8s.io", "endpointslices"))
              for verb in ("get", "list", "watch")}
    assert granted == wanted
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in rules)
    binding = find("ClusterRoleBinding", "nodeproxy")
    assert binding["roleRef"]["name"] == "nodeproxy"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nodeproxy",
                                    "namespace": "nodeproxy-system"}]
    assert pod_spec()["serviceAccountName"] == "nodeproxy"


def test_daemon_capabilities_are_exactly_the_documented_set():
    context = container("nodeproxy")["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == CAPABILITIES
    text = (K8S / "daemonset.yaml").read_text()
    for cap in CAPABILITIES:  # each one says why it is there
        assert f"- {cap}\n" in text
    assert "SYS_PTRACE" not in str(pod_spec()) and pod_spec()["hostPID"] is False


def test_only_the_bpffs_mount_container_is_privileged():
    """The API server allows Bidirectional propagation only in privileged containers
    (a rule the JSON schemas cannot express)."""
    spec = pod_spec()
    for c in spec["containers"] + spec["initContainers"]:
        privileged = c.get("securityContext", {}).get("privileged", False)
        assert privileged == (c["name"] == "mount-bpffs"), c["name"]
        for mount in c.get("volumeMounts", []):
            if mount.get("mountPropagation") == "Bidirectional":
                assert privileged, f"{c['name']}: Bidirectional needs privileged"
    mount = container("mount-bpffs")
    assert "mount -t bpf bpf /sys/fs/bpf" in " ".join(mount["command"])


def test_mounts_reach_declared_volumes_and_the_host_paths_the_design_needs():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"] + spec["initContainers"]:
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, (c["name"], mount["name"])
    mounts = {m["mountPath"]: m for m in container("nodeproxy")["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert volumes[mounts["/sys/fs/cgroup"]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert volumes[mounts["/run/nodeproxy"]["name"]]["hostPath"]["path"] == "/run/nodeproxy"
    assert "/proc" not in mounts
    assert spec["hostNetwork"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]


def test_probes_scrape_annotations_and_the_drain_fit_the_policy():
    config = parse_config(node_policy()).config
    daemon = container("nodeproxy")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert daemon[probe]["httpGet"] == {"path": "/healthz/ready",
                                            "port": config.admin.readiness_port}
    annotations = find("DaemonSet", "nodeproxy")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.admin.metrics_port)
    assert set(daemon["resources"]) == {"requests", "limits"}
    ds = find("DaemonSet", "nodeproxy")["spec"]
    # The new daemon takes over from the old one (surge), so no node is ever without one.
    assert ds["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert pod_spec()["terminationGracePeriodSeconds"] > config.proxy.drain_seconds


def parse(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    result: argparse.Namespace = parser.parse_args(argv)
    return result


def test_install_cni_and_pre_stop_commands_parse_and_agree_with_the_policy():
    config = parse_config(node_policy()).config
    installer = container("install-cni")
    assert installer["command"] == ["python3", "-m", "nodeproxy.cni.install"]
    args = parse(install, installer["args"])
    assert args.control_socket == config.admin.control_socket
    assert {"kube-system", "nodeproxy-system"} <= set(args.exclude_namespace)
    pre_stop = container("nodeproxy")["lifecycle"]["preStop"]["exec"]["command"]
    argv = shlex.split(pre_stop[-1].replace('"$NODE_NAME"', "worker-1"))
    assert argv[:4] == ["exec", "nodeproxy", "uninstall", "--only-if-leaving"]
    stop = parse(uninstall, argv[3:])
    assert stop.node == "worker-1" and stop.bpffs == config.node.bpffs
    assert (stop.cni_conf_dir, stop.cni_bin_dir) == (args.conf_dir, args.bin_dir)


def test_nodes_mount_the_root_certificate_and_no_ca_key():
    """Issue 19: a node holds no CA key; it trusts the root and asks the signer."""
    root = find("ConfigMap", "nodeproxy-ca-root")
    assert set(root["data"]) == {"root-cert.pem"}
    assert root["data"]["root-cert.pem"].startswith("REPLACE-ME")
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca"]["configMap"]["name"] == "nodeproxy-ca-root"
    assert not [v for v in spec["volumes"] if "secret" in v]  # no Secret at all
    mounts = {m["name"]: m["mountPath"] for m in container("nodeproxy")["volumeMounts"]}
    assert mounts["ca"] == "/etc/nodeproxy/ca"
    identity = parse_config(node_policy()).config.identity
    assert identity.ca_cert == "/etc/nodeproxy/ca/root-cert.pem"
    assert identity.ca_key is None and identity.signer is not None
    # The token the signer authenticates the node by: projected, for its audience,
    # mounted where the policy says.
    [source] = volumes["signer-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert f"{mounts['signer-token']}/{token['path']}" == identity.signer.token_path
    assert token["expirationSeconds"] <= 3600
    signer_args = dict(a.removeprefix("--").split("=", 1)
                       for a in signer_container()["args"] if a.startswith("--"))
    assert token["audience"] == signer_args["audience"]
    assert signer_args["node-agent"] == \
        f"system:serviceaccount:nodeproxy-system:{spec['serviceAccountName']}"
    service = find("Service", "nodeproxy-ca")
    host, port = identity.signer.address.removeprefix("https://").rsplit(":", 1)
    assert host in signer_args_all("dns-name")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert signer_args["listen"].endswith(f":{port}")


def signer_container() -> dict[str, Any]:
    deployment = find("Deployment", "nodeproxy-ca")
    [signer] = deployment["spec"]["template"]["spec"]["containers"]
    return signer


def signer_args_all(name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in signer_container()["args"]
            if a.startswith(f"--{name}=")]


def test_the_signer_holds_the_intermediate_only_and_may_read_only_what_it_checks():
    secret = find("Secret", "nodeproxy-ca-signing")
    assert set(secret["stringData"]) == {"ca-cert.pem", "ca-key.pem"}
    assert all(v.startswith("REPLACE-ME") for v in secret["stringData"].values())
    text = (K8S / "secret.yaml").read_text()
    assert "nodeproxy ca init" in text and "root-key.pem stays offline" in text
    for path in manifest_files():
        assert "root-key.pem:" not in path.read_text(), path  # no manifest carries the root key
    deployment = find("Deployment", "nodeproxy-ca")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "nodeproxy-ca"
    [volume] = spec["volumes"]
    assert volume["secret"]["secretName"] == "nodeproxy-ca-signing"
    [mount] = signer_container()["volumeMounts"]
    args = dict(a.removeprefix("--").split("=", 1) for a in signer_container()["args"]
                if a.startswith("--"))
    assert args["cert"] == f"{mount['mountPath']}/ca-cert.pem"
    assert args["key"] == f"{mount['mountPath']}/ca-key.pem"
    assert args["trust-domain"] == parse_config(node_policy()).config.mesh.trust_domain
    security = signer_container()["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["readOnlyRootFilesystem"]
    assert spec["securityContext"]["runAsNonRoot"]
    # RBAC: create TokenReviews, get/list pods; nothing else.
    role = find("ClusterRole", "nodeproxy-ca")
    assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in role["rules"]] == [
        (["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        ([""], ["pods"], ["get", "list"])]
    binding = find("ClusterRoleBinding", "nodeproxy-ca")
    assert binding["roleRef"]["name"] == "nodeproxy-ca"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nodeproxy-ca",
                                    "namespace": "nodeproxy-system"}]
    # The serve command line parses (the same parser the CLI uses).
    from nodeproxy.cli import ca as ca_cli
    parser = argparse.ArgumentParser()
    ca_cli.add_arguments(parser)
    assert signer_container()["command"] == ["nodeproxy"] and signer_container()["args"][0] == "ca"
    parsed = parser.parse_args(signer_container()["args"][1:])
    assert parsed.ca_command == "serve" and parsed.audience == "nodeproxy-ca"


def test_example_app_policy_is_valid_and_names_the_app_services():
    example = K8S / "example-app"
    config = parse_config(node_policy(example), "example-app/policy.yaml").config
    assert config.mesh.outbound_policy == "REGISTRY_ONLY"
    for service in config.services:
        k8s = find("Service", service.name, example)
        assert k8s["metadata"]["namespace"] == service.namespace
        assert [str(v) for v in service.vips] == [k8s["spec"]["clusterIP"]]
        assert [(p.port, p.backend_port) for p in service.ports] == [
            (p["port"], p["targetPort"]) for p in k8s["spec"]["ports"]]
        assert service.selector == k8s["spec"]["selector"]
    assert {s.name for s in config.services} == {"frontend", "backend"}
