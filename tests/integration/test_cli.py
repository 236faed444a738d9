"""The CLI as a user runs it: the demo end to end, and `run` refusing what it cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

NODEPROXY = [sys.executable, "-m", "nodeproxy"]


def test_demo_json_shows_traffic_on_every_service():
    result = subprocess.run([*NODEPROXY, "demo", "--duration", "5", "--json"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["mesh"]
    assert len(summary["services"]) >= 2
    for name, service in summary["services"].items():
        assert service["requests_ok"] > 0 and service["requests_failed"] == 0, (
            name, service["errors"], result.stderr[-3000:])
        # The mesh's own count for the service equals the clients' requests: per request
        # where the port speaks HTTP (web, nginx, detected), per connection elsewhere (echo).
        if name == "default/web":
            assert service["mesh_http"]["requests"] == service["requests_ok"], name
        else:
            assert service["mesh_tcp"]["connections_opened"] == service["requests_ok"], name
    clients = [w for w in summary["workloads"].values() if w["connections_captured"]]
    assert len(clients) >= 2
    assert {w["node"] for w in clients} == {"node0", "node1"}
    assert all(code["exit_code"] == 0 for code in summary["daemons"].values())


def test_run_refuses_an_invalid_config_naming_file_and_line(tmp_path):
    bad = tmp_path / "node.yaml"
    bad.write_text("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\n"
                   "node:\n  name: n1\nmesh:\n  outboundPolicy: DENY\n")
    result = subprocess.run([*NODEPROXY, "run", "--config", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert f"{bad}:6: mesh.outboundPolicy: must be one of ALLOW_ANY, REGISTRY_ONLY" in (
        result.stderr)


def test_run_refuses_a_missing_netns(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\n"
                   "node:\n  name: n1\nworkloads:\n  - name: gone\n"
                   "    netns: /run/netns/npt-does-not-exist\n"
                   "    cgroup: /sys/fs/cgroup\n    ips: [10.244.9.9]\n")
    result = subprocess.run([*NODEPROXY, "run", "--config", str(cfg)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert f"{cfg}:7: workloads[0].netns:" in result.stderr
    assert "does not exist" in result.stderr


def test_run_without_privileges_refuses_with_the_check_line(tmp_path):
    """uid 0 with every capability dropped, as in a container that is not privileged.

    The privileges check is about effective capabilities, not the uid.  Staying uid 0
    keeps the test independent of where the checkout and its venv lie: a clone under a
    0700 directory (/root) cannot even be read by an unprivileged uid.
    """
    cfg = tmp_path / "node.yaml"
    cfg.write_text("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\nnode: {name: n1}\n")
    drop = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
    env = dict(os.environ)
    status = subprocess.run([*drop, "grep", "^CapEff:", "/proc/self/status"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert int(status.stdout.split()[1], 16) == 0, status.stdout
    result = subprocess.run([*drop, *NODEPROXY, "run", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    assert "cannot run the daemon" in result.stderr
    assert "FAIL  privileges" in result.stderr
    check = subprocess.run([*drop, *NODEPROXY, "check"], capture_output=True, text=True,
                           timeout=120, env=env)
    privileges_line = next(line for line in check.stdout.splitlines()
                           if line.startswith("FAIL  privileges"))
    assert privileges_line in result.stderr


def test_run_refuses_a_capture_mode_the_machine_lacks(tmp_path):
    """iptables mode on a machine without the iptables tools (PATH without them)."""
    cfg = tmp_path / "node.yaml"
    cfg.write_text("apiVersion: nodeproxy.io/v1alpha1\nkind: NodeProxyConfig\n"
                   "node: {name: n1}\ncapture: {mode: iptables}\n")
    env = dict(os.environ, PATH="/nonexistent")
    result = subprocess.run([*NODEPROXY, "run", "--config", str(cfg)], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    assert "cannot run the daemon in capture mode iptables" in result.stderr
    assert "FAIL  iptables" in result.stderr and "not found on PATH" in result.stderr
