"""vagrant/Vagrantfile: valid Ruby, and it configures what vagrant/README.md says.

`ruby -c` checks the syntax.  Then the file is evaluated for real, against a
small stand-in for Vagrant's configuration API (Vagrant itself is not needed)
that records every setting, and each provisioning script is checked with
`bash -n`.  Ruby is a test dependency (scripts/setup.sh installs it): without it
these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"

# Records every `config.x.y = v` and `config.x.y(args) { |sub| ... }` as JSON.
STUB = r'''
require "json"

class Recorder
  def initialize(path)
    @path = path
    @calls = []
    @children = {}
  end

  def method_missing(name, *args, **kwargs, &block)
    name = name.to_s
    here = (@path + [name.chomp("=")]).join(".")
    if name.end_with?("=")
      @calls << { "path" => here, "value" => args.first }
      return args.first
    end
    child = (@children[name] ||= Recorder.new(@path + [name]))
    return child if args.empty? && kwargs.empty? && block.nil?
    sub = Recorder.new(@path + [name])
    block&.call(sub)
    @calls << { "path" => here, "args" => args.map(&:to_s), "kwargs" => kwargs,
                "block" => sub.all_calls }
    sub
  end

  def respond_to_missing?(*) = true

  def all_calls = @calls + @children.values.flat_map(&:all_calls)
end

module Vagrant
  @configs = []
  def self.require_version(*) = nil
  def self.configure(version)
    raise "config version #{version}" unless version == "2"
    config = Recorder.new(["config"])
    yield config
    @configs << config
  end
  def self.dump = JSON.generate(@configs.flat_map(&:all_calls))
end

load ARGV.fetch(0)
puts Vagrant.dump
'''


def ruby() -> str:
    path = shutil.which("ruby")
    if path is None:
        pytest.fail("ruby is not installed: run `make setup` (scripts/setup.sh installs it)",
                    pytrace=False)
    return path


def evaluate(stub_dir: Path, **env: str) -> list[dict[str, Any]]:
    stub = stub_dir / "stub.rb"
    stub.write_text(STUB)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODEPROXY_")}
    out = subprocess.run([ruby(), str(stub), str(VAGRANTFILE)], capture_output=True,
                         text=True, timeout=60, cwd=VAGRANTFILE.parent, env=environ | env)
    assert out.returncode == 0, out.stderr
    recorded: list[dict[str, Any]] = json.loads(out.stdout)
    return recorded


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return evaluate(tmp_path_factory.mktemp("vagrant"))


def named(calls: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [c for c in calls if c["path"] == path]


def provisioners(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = named(calls, "config.vm.provision")
    for define in named(calls, "config.vm.define"):
        found += named(define["block"], "config.vm.define.vm.provision")
    return {p["args"][0]: p["kwargs"] for p in found}


def test_vagrantfile_is_valid_ruby():
    out = subprocess.run([ruby(), "-c", str(VAGRANTFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_box_and_both_providers_get_2_cpus_and_4_gib(calls: list[dict[str, Any]]):
    assert named(calls, "config.vm.box")[0]["value"] == "debian/bookworm64"
    providers = {p["args"][0]: {c["path"].rsplit(".", 1)[1]: c["value"] for c in p["block"]}
                 for p in named(calls, "config.vm.provider")}
    assert providers == {"libvirt": {"cpus": 2, "memory": 4096},
                         "virtualbox": {"cpus": 2, "memory": 4096}}


def test_the_repo_is_synced_into_the_guest(calls: list[dict[str, Any]]):
    folders = {c["args"][1]: c for c in named(calls, "config.vm.synced_folder")}
    repo = folders["/nodeproxy"]
    assert Path(repo["args"][0]) == REPO and repo["kwargs"]["type"] == "rsync"
    assert ".venv/" in repo["kwargs"]["rsync__exclude"]
    # build/ holds the VM boxes (GBs of disk images): never copied into the guest.
    assert "build/" in repo["kwargs"]["rsync__exclude"]


def test_provisioning_runs_the_readme_commands(calls: list[dict[str, Any]]):
    steps = provisioners(calls)
    assert list(steps)[:3] == ["kernel", "setup", "test"]
    assert steps["kernel"]["reboot"] is True
    assert 'make -C "$NODEPROXY_REPO" setup' in steps["setup"]["inline"]
    assert 'make -C "$NODEPROXY_REPO" test' in steps["test"]["inline"]
    assert steps["test"]["run"] == "never"  # a documented, on-demand step
    assert steps["setup"]["env"]["NODEPROXY_REPO"] == "/nodeproxy"
    assert "--dry-run=server -k" in steps["k3s"]["inline"]
    k3s = next(d for d in named(calls, "config.vm.define") if d["args"][0] == "k3s")
    assert k3s["kwargs"]["autostart"] is False


def test_every_provisioning_script_is_valid_shell(calls: list[dict[str, Any]],
                                                  tmp_path: Path):
    for name, step in provisioners(calls).items():
        script = tmp_path / f"{name}.sh"
        script.write_text(step["inline"])
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, f"{name}: {out.stderr}"


def test_readme_documents_vagrant_up_and_the_test_command():
    text = (REPO / "vagrant" / "README.md").read_text()
    for command in ("vagrant up", "--provision-with test", "make test"):
        assert command in text, command


def test_a_local_box_keeps_its_own_kernel_and_skips_the_reboot(tmp_path: Path):
    """`make vm-test` boots a box on a chosen Debian kernel: the kernel step must not
    move it to the backports kernel, and must not reboot for nothing."""
    steps = provisioners(evaluate(tmp_path, NODEPROXY_BOX="nodeproxy/bookworm-6.1",
                                  NODEPROXY_KEEP_KERNEL="1"))
    kernel = steps["kernel"]
    assert kernel["reboot"] is False and kernel["env"] == {"NODEPROXY_KEEP_KERNEL": "1"}
    script = tmp_path / "kernel.sh"
    script.write_text(kernel["inline"])
    # The script leaves before it could touch apt (it would fail here: not root,
    # or no network) and says which kernel it keeps.
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "NODEPROXY_KEEP_KERNEL": "1"})
    assert out.returncode == 0, out.stderr
    assert f"keeping the box's kernel {os.uname().release}" in out.stdout
    box = evaluate(tmp_path, NODEPROXY_BOX="nodeproxy/bookworm-6.1")
    assert named(box, "config.vm.box")[0]["value"] == "nodeproxy/bookworm-6.1"


def test_vm_scripts_are_valid_shell_and_the_box_carries_setup_packages():
    for script in ("vm_box.sh", "vm_test.sh", "vm_host.sh"):
        out = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    # vm_box.sh reads setup.sh's APT_PACKAGES the same way: the list must parse and
    # hold setup.sh's packages, or the box would miss one and setup would install it
    # slowly under emulation (or not at all).
    text = (REPO / "scripts" / "setup.sh").read_text()
    out = subprocess.run(
        ["bash", "-c", 'eval "$(sed -n "/^APT_PACKAGES=(/,/^)/p" "$1")"; '
         'printf "%s\\n" "${APT_PACKAGES[@]}"', "_", str(REPO / "scripts" / "setup.sh")],
        capture_output=True, text=True, timeout=30)
    packages = out.stdout.split()
    assert out.returncode == 0 and "python3-bpfcc" in packages and "nftables" in packages
    assert all(p in text for p in packages) and len(packages) >= 20
