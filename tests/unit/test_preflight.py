"""`nodeproxy check` and the preflight checks, on this machine's real kernel.

The machine this suite runs on (root, Debian 12, kernel 6.18) is the kind nodeproxy
targets, so every essential check must pass here: a failure is a real regression
(or a broken setup) and fails the test with the check's own detail.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nodeproxy.capture import kernelfs, preflight
from nodeproxy.cli import check as check_cli

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results() -> list[preflight.CheckResult]:
    return preflight.run_checks()


def _bpf_prog_fds() -> list[int]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog":
                fds.append(int(fd))
        except OSError:
            continue
    return fds


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeproxy", "check", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )


def test_every_essential_check_passes_on_this_machine(results):
    for mode in preflight.CAPTURE_MODES:
        failures = preflight.essential_failures(results, mode)
        assert not failures, f"essential preflight checks of {mode} failed:\n" + "\n".join(
            preflight.format_result(r) for r in failures
        )
    assert preflight.supported_modes(results) == ["ebpf", "iptables"]


def test_each_check_says_which_capture_modes_need_it(results):
    modes = {r.name: r.modes for r in results}
    assert modes["privileges"] == modes["cgroup-v2"] == ("ebpf", "iptables")
    assert modes["iptables"] == ("iptables",)
    for ebpf_only in ("bcc", "kernel-headers", "cgroup/connect4", "sk_lookup",
                      "cgroup/getsockopt", "capture-program"):
        assert modes[ebpf_only] == ("ebpf",), ebpf_only


def test_checks_cover_every_kernel_feature_the_design_uses(results):
    names = [r.name for r in results]
    assert names == preflight.check_names()
    assert len(set(names)) == len(names)
    for needed in ("privileges", "kernel-version", "bcc", "kernel-headers", "cgroup-v2",
                   "bpffs", "bpf-jit", "cgroup/connect4", "cgroup/connect6", "sockops",
                   "sockhash+sk_msg", "sk_skb-stream-verdict", "sk_lookup",
                   "cgroup/getsockopt", "netns-cookie-in-sockops", "sk-storage",
                   "capture-program", "iptables", "netns-cookie-sockopt"):
        assert needed in names
        assert next(r for r in results if r.name == needed).essential, needed
    # Informational only: the design must not depend on them (off in this kernel).
    for optional in ("kprobes", "kernel-tls", "cni-plugins", "btf"):
        assert not next(r for r in results if r.name == optional).essential, optional


def test_demo_and_tests_prerequisite_cni_plugins_present(results):
    cni = next(r for r in results if r.name == "cni-plugins")
    assert cni.ok, preflight.format_result(cni)


def test_run_checks_leaves_no_bpf_programs_or_mounts_behind():
    def ours() -> list[kernelfs.Mount]:
        # Other tests (and other runs on the machine) mount bpffs and netns files
        # concurrently: look only at what the checks could leave, their probe mounts and
        # the node's /sys/fs/bpf.
        return [m for m in kernelfs.read_mounts()
                if "nodeproxy-bpffs-check-" in m.mountpoint or m.mountpoint == "/sys/fs/bpf"]

    before_fds = _bpf_prog_fds()
    before_mounts = ours()
    preflight.run_checks()
    assert _bpf_prog_fds() == before_fds
    assert ours() == before_mounts
    assert not list(Path(tempfile.gettempdir()).glob("nodeproxy-bpffs-check-*"))


def test_nodeproxy_check_prints_one_line_per_check_and_exits_0(results):
    proc = _run_cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    check_lines = [line for line in lines if line.startswith(("PASS  ", "FAIL  "))]
    assert [line.split()[1] for line in check_lines] == [r.name for r in results]
    assert len(lines) == len(results) + 1  # plus the summary
    assert "nodeproxy can run on this node (capture modes: ebpf, iptables)" in lines[-1]
    # bcc's compiler and verifier chatter must not leak out around the report.
    assert proc.stderr == ""


def test_nodeproxy_check_json_parses(results):
    proc = _run_cli("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, list)
    assert [item["name"] for item in data] == [r.name for r in results]
    for item in data:
        assert set(item) == {"name", "ok", "detail", "hint", "essential", "modes"}
        assert item["modes"] and set(item["modes"]) <= {"ebpf", "iptables"}
        assert isinstance(item["ok"], bool) and isinstance(item["essential"], bool)
        if not item["ok"]:
            assert item["hint"], item


def test_missing_capabilities_fail_with_a_fix_hint_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "read_effective_caps", lambda: 0)
    parser = check_cli_parser()
    code = check_cli.run(parser.parse_args([]))
    out = capsys.readouterr().out
    assert code == 1
    line = next(line for line in out.splitlines() if line.split()[1:2] == ["privileges"])
    assert line.startswith("FAIL  privileges")
    assert "CAP_BPF" in line and "— fix: " in line and "root" in line.split("— fix: ")[1]
    assert "nodeproxy cannot run on this node" in out.splitlines()[-1]


def test_without_iptables_the_node_runs_in_ebpf_mode_only(monkeypatch):
    """A real missing tool: PATH without the iptables binaries."""
    monkeypatch.setenv("PATH", "/nonexistent")
    result = preflight.check_iptables()
    assert not result.ok and result.essential and result.modes == ("iptables",)
    line = preflight.format_result(result)
    assert line.startswith("FAIL  iptables")
    assert "iptables-restore" in line and "(needed by capture mode iptables)" in line
    assert "apt install iptables" in line
    others = [preflight.check_privileges(), preflight.CheckResult(
        "cgroup/connect4", True, "loaded", "", True, ("ebpf",))]
    assert preflight.supported_modes([*others, result]) == ["ebpf"]
    assert preflight.essential_failures([*others, result]) == []
    assert preflight.essential_failures([*others, result], "iptables") == [result]
    assert preflight.summary_line([*others, result]).endswith(
        "nodeproxy can run on this node in capture mode ebpf only (iptables needs iptables)")


def test_require_essential_raises_with_the_fail_lines(monkeypatch):
    monkeypatch.setattr(preflight, "read_effective_caps", lambda: 1 << preflight.CAP_BPF)
    results = [preflight.check_privileges()]
    with pytest.raises(preflight.PreflightError) as info:
        preflight.require_essential(results)
    assert [r.name for r in info.value.failures] == ["privileges"]
    assert str(info.value).startswith("FAIL  privileges")
    assert "CAP_NET_ADMIN, CAP_SYS_ADMIN" in str(info.value)


def test_optional_failure_is_marked_optional_and_not_essential():
    r = preflight.CheckResult("kprobes", False, "not there", "not needed", essential=False)
    assert preflight.format_result(r) == (
        f"FAIL  {'kprobes':<24}  not there (optional) — fix: not needed"
    )
    assert preflight.essential_failures([r]) == []
    assert "none essential" in preflight.summary_line([r])


def check_cli_parser():
    import argparse

    parser = argparse.ArgumentParser()
    check_cli.add_arguments(parser)
    return parser


# ---------------------------------------------------------------- kernelfs

def test_find_cgroup2_mount_matches_proc_mounts():
    with open("/proc/mounts", encoding="utf-8") as f:
        cgroup2 = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    assert cgroup2, "this machine has cgroup v2 mounted"
    mount = kernelfs.find_cgroup2_mount()
    assert mount == cgroup2[0]
    assert os.path.isfile(os.path.join(mount, "cgroup.procs"))


def test_find_cgroup2_mount_without_one_is_a_clear_error(tmp_path):
    fake = tmp_path / "mounts"
    fake.write_text("proc /proc proc rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(kernelfs.KernelFsError, match="no cgroup v2"):
        kernelfs.find_cgroup2_mount(str(fake))


def test_mount_points_with_spaces_are_unescaped(tmp_path):
    fake = tmp_path / "mounts"
    fake.write_text("none /run/my\\040cgroup cgroup2 rw 0 0\n")
    assert kernelfs.find_cgroup2_mount(str(fake)) == "/run/my cgroup"


def test_default_pod_cgroup_prefers_kubepods_slice(tmp_path):
    assert kernelfs.default_pod_cgroup(str(tmp_path)) == str(tmp_path / "kubepods")
    (tmp_path / "kubepods").mkdir()
    assert kernelfs.default_pod_cgroup(str(tmp_path)) == str(tmp_path / "kubepods")
    (tmp_path / "kubepods.slice").mkdir()
    assert kernelfs.default_pod_cgroup(str(tmp_path)) == str(tmp_path / "kubepods.slice")


def test_ensure_bpffs_mounts_once_and_is_idempotent():
    scratch = tempfile.mkdtemp(prefix="nodeproxy-test-bpffs-")
    target = os.path.join(scratch, "bpf")  # does not exist yet: ensure_bpffs creates it
    try:
        assert not kernelfs.is_bpffs(target)
        kernelfs.ensure_bpffs(target)
        assert kernelfs.is_bpffs(target)
        kernelfs.ensure_bpffs(target)
        mounts = [m for m in kernelfs.read_mounts() if m.mountpoint == target]
        assert [m.fstype for m in mounts] == ["bpf"]
    finally:
        while kernelfs.is_bpffs(target):
            kernelfs.unmount(target)
        if os.path.isdir(target):
            os.rmdir(target)
        os.rmdir(scratch)


def test_is_bpffs_is_false_for_other_filesystems(tmp_path):
    assert not kernelfs.is_bpffs(str(tmp_path))
    assert not kernelfs.is_bpffs("/proc")


def test_a_rejected_or_broken_program_is_reported_with_the_kernels_reason(monkeypatch):
    bcc = preflight.import_bcc()
    good = next(f for f in preflight._FEATURES if f.name == "sockops")
    rejected = dataclasses.replace(good, name="rejected", code="""
int npchk_sockops(struct bpf_sock_ops *skops) {
    int *p = (int *)(long)skops->op;
    return *p;
}
""")
    broken = dataclasses.replace(good, name="broken", programs=(),
                                 code="int npchk_broken(void *ctx) { return nope; }\n")
    # Verifier rejection: the verifier's own verdict is in the detail.
    monkeypatch.setattr(preflight, "_FEATURES", (rejected,))
    [result] = preflight.check_bpf_features(bcc)
    assert not result.ok and "invalid mem access" in result.detail, result
    # A compile error in one feature does not fail the others; the compiler's message is kept.
    monkeypatch.setattr(preflight, "_FEATURES", (good, broken))
    ok, bad = preflight.check_bpf_features(bcc)
    assert ok.ok, preflight.format_result(ok)
    assert not bad.ok and "does not compile" in bad.detail and "nope" in bad.detail, bad


def test_bpffs_check_proves_mountability_when_not_mounted(tmp_path):
    target = tmp_path / "bpf"
    result = preflight.check_bpffs(str(target))
    assert result.ok and "mountable" in result.detail, preflight.format_result(result)
    assert not target.exists()  # the check only mounted a scratch directory
    assert not [m for m in kernelfs.read_mounts() if "nodeproxy-bpffs-check-" in m.mountpoint]


def test_own_cgroup_is_found_also_from_inside_a_cgroup_namespace(tmp_path):
    """The daemon attaches its SO_ORIGINAL_DST program to its own cgroup.  In a container
    with a private cgroup namespace /proc/self/cgroup says "/" while the host's hierarchy
    is mounted: the directory listing the process is found anyway."""
    mount = kernelfs.find_cgroup2_mount()
    cgroup = os.path.join(mount, f"nodeproxy-test-own-{os.getpid()}")
    os.mkdir(cgroup)
    child = subprocess.Popen(["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec sleep 30'])
    try:
        for _ in range(200):
            if os.path.exists(f"/proc/{child.pid}") and \
                    str(child.pid) in Path(cgroup, "cgroup.procs").read_text().split():
                break
            time.sleep(0.01)
        fake = tmp_path / "cgroup"
        for seen in (f"0::/{os.path.basename(cgroup)}\n", "1:name=systemd:/\n0::/\n"):
            fake.write_text(seen)
            assert kernelfs.own_cgroup(mount, pid=child.pid, proc_cgroup=str(fake)) == cgroup
        assert kernelfs.own_cgroup(mount) == os.path.normpath(os.path.join(
            mount, Path("/proc/self/cgroup").read_text().split("0::", 1)[1].strip().lstrip("/")))
    finally:
        child.kill()
        child.wait()
        os.rmdir(cgroup)


def test_a_helper_the_kernel_lacks_is_named_not_blamed_on_the_feature():
    """Debian 11's 5.10 has sockhash and sk_msg; its verifier refuses only the netns cookie
    helper: the line names the helper and the kernel it needs, not a missing config."""
    why = ("Failed to load BPF program b'npchk_sockhash_add': Invalid argument: "
           "unknown func bpf_get_netns_cookie#122")
    detail, hint = preflight._explain(why, preflight._SOCKMAP_HINT, privileged=True)
    assert "BPF helper bpf_get_netns_cookie" in detail and "#122" in detail
    assert hint.startswith("bpf_get_netns_cookie needs kernel >= 5.15")
    assert "CONFIG_" not in hint
    _, other = preflight._explain(why.replace("bpf_get_netns_cookie", "bpf_new_thing"),
                                  preflight._SOCKMAP_HINT, privileged=True)
    assert other == "a kernel that offers bpf_new_thing to this program type"


def test_without_so_netns_cookie_only_iptables_mode_can_run(monkeypatch):
    """Debian 11's 5.10 answers getsockopt(SO_NETNS_COOKIE) with ENOPROTOOPT (5.14+):
    ebpf mode cannot key pods in its maps; iptables mode keys them by netns inode."""
    def refuse(_sock):
        raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
    monkeypatch.setattr(preflight, "netns_cookie_of", refuse)
    result = preflight.check_netns_cookie_sockopt()
    assert not result.ok and result.essential
    assert set(result.modes) == {"ebpf"}
    line = preflight.format_result(result)
    assert "Protocol not available" in line and "kernel >= 5.14" in line
    assert "iptables mode runs without it" in line


def test_run_refuses_ebpf_mode_without_so_netns_cookie_and_allows_iptables(monkeypatch):
    """`nodeproxy run` in ebpf mode stops with the check's line rather than running with
    no pod; in iptables mode the check is not in its way."""
    from nodeproxy.cli import run as run_cli

    def refuse(_sock):
        raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
    monkeypatch.setattr(preflight, "netns_cookie_of", refuse)
    lines = run_cli.preflight_failures("ebpf")
    assert any(line.startswith("FAIL  netns-cookie-sockopt") for line in lines), lines
    assert not any("netns-cookie-sockopt" in line
                   for line in run_cli.preflight_failures("iptables"))
    monkeypatch.undo()
    assert not any("netns-cookie-sockopt" in line for line in run_cli.preflight_failures("ebpf"))
