"""Unit tests for the node policy loader, environment checks and `nodeproxy validate`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import ipaddress
import os
import textwrap
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from nodeproxy.cli import main as cli_main
from nodeproxy.config import (
    ConfigError,
    ConfigReadError,
    environment_problems,
    format_path,
    load_config,
    parse_config,
)
from nodeproxy.config.changes import restart_only_changes
from nodeproxy.config.environment import cgroup2_mounts
from nodeproxy.config.model import NodeConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "example-node.yaml"

HEAD = """\
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node:
  name: node-a
"""

VALID = HEAD + """\
workloads:
  - name: web
    namespace: shop
    netns: /run/netns/web
    cgroup: /sys/fs/cgroup/web
    labels: {app: web}
    ips: [10.244.1.10]
  - name: db
    namespace: shop
    node: node-b
    ips: [10.244.2.20]
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports:
      - port: 80
        targetPort: 8080
    selector: {app: web}
"""


def problems(text: str) -> list[str]:
    """The problems parse_config reports for text (which must be invalid)."""
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "node.yaml")
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def local_workload(**fields: str) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in fields.items())
    return HEAD + "workloads:\n  - name: web\n" + lines + "    ips: [10.0.0.1]\n"


# --- valid documents -------------------------------------------------------------------------


def test_valid_document_round_trips_with_defaults() -> None:
    loaded = parse_config(VALID)
    config = loaded.config
    assert loaded.source == "<string>"
    assert loaded.digest == hashlib.sha256(VALID.encode()).hexdigest()
    assert loaded.loaded_at > 0
    assert config.node.name == "node-a"
    assert config.mesh.outbound_policy == "ALLOW_ANY"
    assert config.mesh.trust_domain == "cluster.local"
    assert config.proxy.outbound_port == 15001
    assert config.capture.on_crash == "fail_closed"
    web, db = config.workloads
    assert web.service_account == "default"
    assert web.ips == [ipaddress.ip_address("10.244.1.10")]
    assert [w.name for w in config.local_workloads()] == ["web"]
    assert config.services[0].ports[0].backend_port == 8080
    again = NodeConfig.model_validate(config.model_dump(by_alias=True))
    assert again == config


def test_config_objects_are_frozen() -> None:
    loaded = parse_config(VALID)
    with pytest.raises(ValidationError):
        loaded.config.node.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        loaded.config.workloads[0].netns = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.digest = "x"  # type: ignore[misc]


def test_load_config_reads_file_and_digests_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(VALID)
    loaded = load_config(path)
    assert loaded.source == str(path)
    assert loaded.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(loaded.config.workloads) == 2


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = HEAD + """\
workloads:
  - &remote
    name: a
    node: node-b
    ips: [10.0.0.1]
  - <<: *remote
    name: b
    ips: [10.0.0.2]
"""
    config = parse_config(text).config
    assert [(w.name, w.node) for w in config.workloads] == [("a", "node-b"), ("b", "node-b")]


def test_format_path() -> None:
    assert format_path(("workloads", 0, "ips", 1)) == "workloads[0].ips[1]"
    assert format_path(("mesh", "outboundPolicy")) == "mesh.outboundPolicy"
    assert format_path(()) == ""
    assert format_path(("workloads", 0, "labels", "app.kubernetes.io/name")) == (
        "workloads[0].labels['app.kubernetes.io/name']"
    )


def test_example_config_validates() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.config.workloads and loaded.config.services


def test_example_config_uses_every_field() -> None:
    used: set[str] = set()

    def collect(value: object) -> None:
        if isinstance(value, dict):
            used.update(str(k) for k in value)
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    text = EXAMPLE.read_text()
    collect(yaml.safe_load(text))
    # Exclusive alternatives cannot both be set: the one left out is shown commented out.
    alternatives = {"caKey": "signer"}
    for field_name, chosen in alternatives.items():
        assert chosen in used and f"# {field_name}: " in text, field_name
    assert all_aliases(NodeConfig) - used - set(alternatives) == set()


def all_aliases(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        for inner in nested_types(field.annotation):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                names |= all_aliases(inner)
    return names


def nested_types(annotation: object) -> list[object]:
    return [annotation] + [t for arg in typing.get_args(annotation) for t in nested_types(arg)]


# --- problems, with their lines ---------------------------------------------------------------


def test_yaml_syntax_error() -> None:
    assert problems(HEAD + "mesh:\n  trustDomain: [a, b\nproxy: {}\n") == [
        "node.yaml:7: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence at line 6)"
    ]
    assert problems(HEAD + "mesh: x: y\n") == [
        "node.yaml:5: YAML syntax error: mapping values are not allowed here"
    ]


def test_wrong_type() -> None:
    assert problems(HEAD + "proxy:\n  outboundPort: eighty\n") == [
        "node.yaml:6: proxy.outboundPort: must be an integer (got 'eighty')"
    ]
    assert problems(HEAD + "mesh:\n  trustDomain: 5\n") == [
        "node.yaml:6: mesh.trustDomain: must be a string (got 5; quote it in YAML)"
    ]
    assert problems(HEAD + "workloads: {}\n") == [
        "node.yaml:5: workloads: must be a list (got a mapping)"
    ]


def test_unknown_field_with_did_you_mean() -> None:
    text = HEAD + "workloads:\n  - name: a\n    node: node-b\n    ips: [10.0.0.1]\n"
    assert problems(text + "    servceAccount: x\n") == [
        "node.yaml:9: workloads[0].servceAccount: unknown field (did you mean 'serviceAccount'?)"
    ]
    assert problems(text + "    service_account: x\n") == [
        "node.yaml:9: workloads[0].service_account: unknown field (did you mean 'serviceAccount'?)"
    ]
    assert problems(text + "    colour: red\n") == [
        "node.yaml:9: workloads[0].colour: unknown field"
    ]


def test_missing_required_field() -> None:
    assert problems("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\n") == [
        "node.yaml:1: node: required field missing"
    ]
    assert problems(HEAD + "workloads:\n  - node: node-b\n    ips: [10.0.0.1]\n") == [
        "node.yaml:6: workloads[0].name: required field missing"
    ]


def test_bad_enum() -> None:
    assert problems(HEAD + "mesh:\n  outboundPolicy: DENY\n") == [
        "node.yaml:6: mesh.outboundPolicy: must be one of ALLOW_ANY, REGISTRY_ONLY (got 'DENY')"
    ]
    assert problems(VALID.replace("NodeProxyConfig", "Pod")) == [
        "node.yaml:2: kind: must be NodeProxyConfig (got 'Pod')"
    ]


def test_bad_ip() -> None:
    text = HEAD + "workloads:\n  - name: a\n    node: node-b\n    ips:\n      - 10.0.0.1\n"
    assert problems(text + "      - not-an-ip\n") == [
        "node.yaml:10: workloads[0].ips[1]: 'not-an-ip' is not a valid IP address"
    ]
    # pydantic alone would read the number 3 as 0.0.0.3.
    assert problems(text + "      - 3\n") == [
        "node.yaml:10: workloads[0].ips[1]: 3 is not a valid IP address"
    ]


def test_port_out_of_range() -> None:
    assert problems(HEAD + "proxy:\n  inboundPort: 70000\n  hbonePort: 0\n") == [
        "node.yaml:6: proxy.inboundPort: must be at most 65535 (got 70000)",
        "node.yaml:7: proxy.hbonePort: must be at least 1 (got 0)",
    ]


def test_live_stats_window_is_bounded() -> None:
    assert parse_config(VALID).config.admin.live_stats_seconds == 60
    assert parse_config(HEAD + "admin:\n  liveStatsSeconds: 0\n").config.admin \
        .live_stats_seconds == 0
    assert problems(HEAD + "admin:\n  liveStatsSeconds: 601\n") == [
        "node.yaml:6: admin.liveStatsSeconds: must be at most 600 (got 601)"]


def test_capture_mode_defaults_to_ebpf_and_accepts_iptables() -> None:
    assert parse_config(VALID).config.capture.mode == "ebpf"
    capture = parse_config(HEAD + "capture:\n  mode: iptables\n").config.capture
    assert (capture.mode, capture.on_crash) == ("iptables", "fail_closed")
    assert problems(HEAD + "capture:\n  mode: nftables\n") == [
        "node.yaml:6: capture.mode: must be one of ebpf, iptables (got 'nftables')"
    ]


def test_iptables_mode_cannot_fail_open() -> None:
    """Its rules are in the pods' netns, not the daemon: a crash cannot take them away."""
    assert problems(HEAD + "capture:\n  mode: iptables\n  onCrash: fail_open\n") == [
        "node.yaml:7: capture.onCrash: mode iptables always fails closed (its rules stay in "
        "the pods after a crash): use fail_closed"
    ]


def test_changing_the_capture_mode_needs_a_restart() -> None:
    old = parse_config(VALID).config
    new = parse_config(VALID + "capture:\n  mode: iptables\n").config
    assert restart_only_changes(old, new) == ["capture"]
    assert restart_only_changes(old, old) == []


def test_duplicate_workload() -> None:
    text = HEAD + """\
workloads:
  - {name: a, node: node-b, ips: [10.0.0.1]}
  - name: a
    node: node-b
    ips: [10.0.0.2]
"""
    assert problems(text) == [
        "node.yaml:7: workloads[1].name: workload default/a is already defined at workloads[0]"
    ]


def test_duplicate_ip_across_workloads() -> None:
    text = HEAD + """\
workloads:
  - {name: a, node: node-b, ips: [10.0.0.1]}
  - name: b
    node: node-b
    ips:
      - 10.0.0.2
      - 10.0.0.1
"""
    assert problems(text) == [
        "node.yaml:11: workloads[1].ips[1]: IP 10.0.0.1 is already used by workloads[0]"
    ]


def test_duplicate_ip_in_one_workload() -> None:
    text = HEAD + "workloads:\n  - {name: a, node: node-b, ips: [10.0.0.1, 10.0.0.1]}\n"
    assert problems(text) == ["node.yaml:6: workloads[0].ips[1]: IP 10.0.0.1 is listed twice"]


SERVICE = """\
  - name: {name}
    vips:
      - {vip}
    ports: [{{port: 80}}]
    selector: {{app: x}}
"""


def test_duplicate_vip() -> None:
    text = HEAD + "services:\n" + SERVICE.format(name="a", vip="10.96.0.1") + SERVICE.format(
        name="b", vip="10.96.0.1"
    )
    assert problems(text) == [
        "node.yaml:13: services[1].vips[0]: VIP 10.96.0.1 is already used by services[0]"
    ]


def test_vip_equal_to_workload_ip() -> None:
    text = (
        HEAD
        + "workloads:\n  - {name: a, node: node-b, ips: [10.96.0.1]}\n"
        + "services:\n"
        + SERVICE.format(name="a", vip="10.96.0.1")
    )
    assert problems(text) == [
        "node.yaml:10: services[0].vips[0]: VIP 10.96.0.1 is also the IP of workloads[0]"
    ]


def test_local_workload_without_netns() -> None:
    text = HEAD + "workloads:\n  - name: a\n    cgroup: /sys/fs/cgroup/a\n    ips: [10.0.0.1]\n"
    assert problems(text) == [
        "node.yaml:6: workloads[0]: workload default/a is on this node, so it needs 'netns'"
    ]


def test_service_without_selector_or_endpoints() -> None:
    text = HEAD + "services:\n  - name: a\n    vips: [10.96.0.1]\n    ports: [{port: 80}]\n"
    assert problems(text) == [
        "node.yaml:6: services[0]: a service needs a selector or endpoints"
    ]


def test_duplicate_key_names_both_lines() -> None:
    text = HEAD + "mesh:\n  trustDomain: a.example\n  outboundPolicy: ALLOW_ANY\n"
    assert problems(text + "  trustDomain: b.example\n") == [
        "node.yaml:8: mesh.trustDomain: duplicate key 'trustDomain' (already at line 6)"
    ]


def test_empty_file() -> None:
    expected = ["node.yaml:1: the file is empty (expected a NodeProxyConfig mapping)"]
    assert problems("") == expected
    assert problems("# nothing but a comment\n") == expected


def test_top_level_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == [
        "node.yaml:1: the top level must be a NodeProxyConfig mapping (got a list)"
    ]


def test_several_problems_reported_at_once_in_line_order() -> None:
    text = """\
apiVersion: nodeproxy.io/v1alpha1
kind: NodeProxyConfig
node:
  name: Node_A
mesh:
  outboundPolicy: DENY
workloads:
  - name: a
    node: node-b
    ips: [10.0.0.1, bad]
    colour: red
"""
    assert problems(text) == [
        "node.yaml:4: node.name: 'Node_A' is not a valid name "
        "(lowercase letters, digits and '-', at most 63)",
        "node.yaml:6: mesh.outboundPolicy: must be one of ALLOW_ANY, REGISTRY_ONLY (got 'DENY')",
        "node.yaml:10: workloads[0].ips[1]: 'bad' is not a valid IP address",
        "node.yaml:11: workloads[0].colour: unknown field",
    ]


def test_cross_checks_report_every_problem() -> None:
    text = HEAD + """\
workloads:
  - {name: a, ips: [10.0.0.1]}
  - {name: a, node: node-b, ips: [10.0.0.1]}
"""
    assert problems(text) == [
        "node.yaml:6: workloads[0]: workload default/a is on this node, so it needs 'netns'",
        "node.yaml:6: workloads[0]: workload default/a is on this node, so it needs 'cgroup'",
        "node.yaml:7: workloads[1].name: workload default/a is already defined at workloads[0]",
        "node.yaml:7: workloads[1].ips[0]: IP 10.0.0.1 is already used by workloads[0]",
    ]


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigReadError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigReadError) as info:
        load_config(tmp_path)
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_bytes(HEAD.encode() + b"mesh:\n  trustDomain: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:6: not UTF-8 text (invalid start byte)"]


# --- environment checks ----------------------------------------------------------------------


def env_config(netns: str, cgroup: str, pod_cgroup: str | None = None) -> str:
    node = f"  podCgroup: {pod_cgroup}\n" if pod_cgroup else ""
    return HEAD + node + local_workload(netns=netns, cgroup=cgroup)[len(HEAD):]


def env_problems(text: str, mounts: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
    return environment_problems(parse_config(text).config, cgroup2_mount_points=mounts)


def test_environment_accepts_real_netns_and_cgroup(tmp_path: Path) -> None:
    if not os.access("/proc/self/ns/net", os.R_OK):
        pytest.skip("cannot open /proc/self/ns/net")
    (tmp_path / "pods" / "web").mkdir(parents=True)
    text = env_config("/proc/self/ns/net", f"{tmp_path}/pods/web", f"{tmp_path}/pods")
    assert env_problems(text, [str(tmp_path)]) == []


def test_environment_reports_bad_netns(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    cgroup = str(tmp_path)
    assert env_problems(env_config(str(plain), cgroup), [cgroup]) == [
        (("workloads", 0, "netns"), f"netns {plain} is not a namespace file")
    ]
    missing = tmp_path / "missing"
    assert env_problems(env_config(str(missing), cgroup), [cgroup]) == [
        (("workloads", 0, "netns"), f"netns {missing} does not exist")
    ]
    if os.access("/proc/self/ns/mnt", os.R_OK):
        text = env_config("/proc/self/ns/mnt", cgroup)
        assert env_problems(text, [cgroup]) == [
            (("workloads", 0, "netns"),
             "netns /proc/self/ns/mnt is a mount namespace, not a network namespace")
        ]


def test_environment_reports_bad_cgroups(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup2"
    (mount / "pods").mkdir(parents=True)
    (mount / "elsewhere").mkdir()
    (tmp_path / "outside").mkdir()
    netns = "/proc/self/ns/net"
    cases = {
        str(tmp_path / "outside"): f"cgroup {tmp_path}/outside is not on a cgroup v2 mount "
        f"({mount})",
        str(mount / "nope"): f"cgroup {mount}/nope does not exist",
        "relative/pod": "cgroup relative/pod is not an absolute path",
    }
    for cgroup, message in cases.items():
        found = env_problems(env_config(netns, cgroup), [str(mount)])
        assert (("workloads", 0, "cgroup"), message) in found
    text = env_config(netns, str(mount / "elsewhere"), str(mount / "pods"))
    assert (
        ("workloads", 0, "cgroup"),
        f"cgroup {mount}/elsewhere is not inside node.podCgroup {mount}/pods",
    ) in env_problems(text, [str(mount)])
    text = env_config(netns, str(mount / "pods"), str(mount / "absent"))
    assert (
        ("node", "podCgroup"), f"cgroup {mount}/absent does not exist"
    ) in env_problems(text, [str(mount)])


def test_environment_ignores_remote_workloads(tmp_path: Path) -> None:
    text = HEAD + "workloads:\n  - {name: a, node: node-b, netns: /nope, ips: [10.0.0.1]}\n"
    assert env_problems(text, []) == []


def test_check_environment_reports_lines(tmp_path: Path) -> None:
    missing = tmp_path / "missing-netns"
    text = local_workload(netns=str(missing), cgroup=str(tmp_path))
    parse_config(text)  # structurally valid
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.yaml", check_environment=True)
    assert f"node.yaml:7: workloads[0].netns: netns {missing} does not exist" in (
        info.value.problems
    )


def test_cgroup2_mounts_parses_proc_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
        "cgroup2 /mnt/with\\040space cgroup2 rw 0 0\n"
    )
    assert cgroup2_mounts(str(mounts)) == ["/sys/fs/cgroup/unified", "/mnt/with space"]
    assert cgroup2_mounts(str(tmp_path / "absent")) == []


# --- nodeproxy validate ----------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> typing.Callable[..., int]:
    """main() with only the subcommand modules that exist yet (others are written in parallel)."""
    present = {
        name: module
        for name, module in cli_main.SUBCOMMANDS.items()
        if importlib.util.find_spec(module) is not None
    }
    monkeypatch.setattr(cli_main, "SUBCOMMANDS", present)
    return lambda *argv: cli_main.main(list(argv))


def test_validate_valid_file(tmp_path: Path, cli: typing.Callable[..., int],
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(VALID)
    assert cli("validate", str(path)) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: valid (2 workloads, 1 services)\n"
    assert err == ""


def test_validate_invalid_file(tmp_path: Path, cli: typing.Callable[..., int],
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(HEAD + "mesh:\n  outboundPolicy: DENY\n  colour: red\n")
    assert cli("validate", str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:6: mesh.outboundPolicy: must be one of ALLOW_ANY, REGISTRY_ONLY (got 'DENY')",
        f"{path}:7: mesh.colour: unknown field",
    ]


def test_validate_environment_flag(tmp_path: Path, cli: typing.Callable[..., int],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(local_workload(netns=str(tmp_path / "nope"), cgroup=str(tmp_path)))
    assert cli("validate", str(path)) == 0
    assert cli("validate", "--environment", str(path)) == 1
    err = capsys.readouterr().err
    assert f"{path}:7: workloads[0].netns: netns {tmp_path}/nope does not exist" in err


def test_validate_unreadable_file_and_usage(tmp_path: Path, cli: typing.Callable[..., int],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    assert cli("validate", str(path)) == 2
    assert capsys.readouterr().err == f"{path}: cannot read: No such file or directory\n"
    with pytest.raises(SystemExit) as info:
        cli("validate")
    assert info.value.code == 2


def test_validate_example(cli: typing.Callable[..., int],
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("validate", str(EXAMPLE)) == 0
    assert capsys.readouterr().out.endswith(": valid (3 workloads, 3 services)\n")


def test_identity_signer_replaces_the_ca_key() -> None:
    signer = ("identity:\n  caCert: /etc/ca/root-cert.pem\n  signer:\n"
              "    address: https://nodeproxy-ca.nodeproxy-system.svc:15012\n")
    config = parse_config(HEAD + signer).config
    assert config.identity.ca_key is None
    assert config.identity.signer is not None
    assert config.identity.signer.token_path == "/var/run/secrets/nodeproxy/token"
    assert config.identity.signer.retry_seconds == 2.0
    [problem] = problems(HEAD + signer.replace("  signer:", "  caKey: /k.pem\n  signer:"))
    assert "identity.caKey" in problem and "holds no CA key" in problem
    [problem] = problems(HEAD + signer.replace("  caCert: /etc/ca/root-cert.pem\n", ""))
    assert "identity.signer" in problem and "needs caCert" in problem
    assert problems(HEAD + signer.replace("https://", "http://"))  # TLS only
