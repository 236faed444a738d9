"""The capture programs are compiled and loaded in a short-lived child
(nodeproxy.capture.load_child): the running daemon never maps bcc's LLVM and clang, a
refusal in the child reaches the daemon with the verifier's own words, and what the
child made (programs, shared and per-instance maps, pins) is gone once the daemon stops.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy.capture import bpf_build, kernelfs, load_child
from nodeproxy_dev.testbed.cluster import Cluster, DaemonError
from tests.integration.probes import connect

pytestmark = pytest.mark.privileged

PORT = 7000
# What bcc's compiler brings: the daemon must map none of it.
COMPILER_LIBRARIES = re.compile(r"libLLVM|libclang|libbcc\.so")
# np_connect4 reads through a number the program made up: every kernel's verifier refuses
# it ("invalid mem access").
REFUSED = ("int np_connect4(struct bpf_sock_addr *ctx)\n{\n"
           "    return *(volatile int *)(long)(ctx->user_ip4 | 1);\n}\n\n"
           "int np_connect4_original(struct bpf_sock_addr *ctx)\n")


@pytest.fixture
def one_node(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """node0 (capture mode: the test's parameter, else ebpf), a client and a service."""
    with Cluster(1, capture_mode=getattr(request, "param", "ebpf")) as c:
        c.add_pod("node0", "client", labels={"app": "client"})
        c.add_pod("node0", "web-0", labels={"app": "web"})
        c.add_service("web", port=80, target_port=PORT)
        c.serve_peer("web-0", PORT)
        yield c


@pytest.fixture
def refusing_sources(tmp_path: Path) -> Path:
    """bpf/ with np_connect4 replaced by one the verifier refuses."""
    src = bpf_build.bpf_source_dir()
    out = tmp_path / "bpf"
    shutil.copytree(src, out)
    capture = (out / "capture.c").read_text()
    head = "int np_connect4(struct bpf_sock_addr *ctx)\n"
    assert capture.count(head) == 1, "np_connect4's definition moved: update REFUSED"
    (out / "capture.c").write_text(capture.replace(head, REFUSED))
    return out


def held_bpf_objects(pid: int) -> set[tuple[str, int]]:
    """("map"|"prog", id) of every BPF map and program the process holds a descriptor of."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for kind in ("map", "prog"):
            found = re.search(rf"^{kind}_id:\s+(\d+)$", info, re.M)
            if found:
                held.add((kind, int(found.group(1))))
    return held


def still_in_kernel(objects: set[tuple[str, int]]) -> set[tuple[str, int]]:
    return {(kind, id_) for kind, id_ in objects
            if subprocess.run(["bpftool", kind, "show", "id", str(id_)],
                              capture_output=True).returncode == 0}


def pins(c: Cluster) -> list[str]:
    root = os.path.join(c.nodes["node0"].bpffs, "nodeproxy")
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("one_node", ["ebpf", "iptables"], indirect=True)
def test_the_daemon_never_maps_the_compiler_and_leaves_nothing_after_it_stops(
        one_node: Cluster):
    c = one_node
    c.write_configs(overrides={"capture": {"onCrash": "fail_closed"}})
    c.start_daemons()
    pid = c.nodes["node0"].daemon.pid
    # Capture works: the programs the child loaded are the daemon's.
    assert connect(c, "client", c.services["default/web"].vip4, 80).startswith("connected")
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "python" in Path(f"/proc/{pid}/cmdline").read_text()
    assert not COMPILER_LIBRARIES.findall(maps), sorted(set(COMPILER_LIBRARIES.findall(maps)))
    assert "libbpf.so" in maps  # how it reaches its maps instead
    held = held_bpf_objects(pid)
    kinds = {kind for kind, _ in held}
    assert kinds == {"map", "prog"}, held
    # Only the shared maps and this instance's links are pinned; the per-instance maps
    # (sockhashes, splice and sk_msg state) live in the daemon's descriptors alone.
    pinned = pins(c)
    assert {p.split("/")[0] for p in pinned} == {"node0"}, pinned
    assert not [p for p in pinned if re.search(r"np_(splice|msg)|splice_", p)], pinned
    assert any("/links/" in p for p in pinned), pinned
    assert c.stop_daemons()["node0"] == 0
    assert pins(c) == []
    deadline = time.monotonic() + 10
    while still_in_kernel(held) and time.monotonic() < deadline:
        time.sleep(0.2)  # the kernel frees maps and programs after an RCU grace period
    assert still_in_kernel(held) == set()


def test_a_verifier_refusal_in_the_child_reaches_the_caller_with_the_verifiers_log(
        refusing_sources: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NODEPROXY_BPF_DIR", str(refusing_sources))
    maps_dir = Path(kernelfs.DEFAULT_BPFFS) / f"nodeproxy-test-child-{uuid.uuid4().hex[:12]}"
    try:
        with pytest.raises(load_child.ProgramLoadError) as refused:
            load_child.load_in_child(load_child.LoadRequest(
                maps_dir=str(maps_dir), mode="ebpf", outbound_port=15001,
                inbound_port=15006, hbone_port=15008))
    finally:
        shutil.rmtree(maps_dir, ignore_errors=True)
    message = str(refused.value)
    # bcc's own error, as the daemon raised it when it loaded the programs itself...
    assert "Failed to load BPF program b'np_connect4'" in message, message
    # ...and the verifier's reason, from the child's stderr.
    assert "invalid mem access" in message, message


def test_a_daemon_whose_programs_are_refused_stops_with_the_verifiers_log(
        one_node: Cluster, refusing_sources: Path, monkeypatch: pytest.MonkeyPatch):
    c = one_node
    monkeypatch.setenv("NODEPROXY_BPF_DIR", str(refusing_sources))
    c.write_configs()
    with pytest.raises(DaemonError) as failed:
        c.start_daemons()
    output = str(failed.value)
    assert "Failed to load BPF program b'np_connect4'" in output, output
    assert "invalid mem access" in output, output
    assert pins(c) == []  # what the child pinned (the shared maps) was removed
    # Nothing was captured: the pod's connection to the service was never steered.
    assert connect(c, "client", c.services["default/web"].vip4, 80) != "connected"
