"""The installer's self-contained-executable path: marker, copy, refusal, uninstall.

The executable itself is built and run in the real CNI chain by
tests/integration/test_cni.py; here the files are small ELF images written by the
test (the marker is an ELF section, as objcopy adds it in scripts/build-cni-plugin.sh).
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

import pytest

from nodeproxy.cli import uninstall
from nodeproxy.cni import install

MARKER = json.dumps({"installedBy": "nodeproxy.cni.install", "version": "0.1.0"}).encode()


def elf(sections: dict[str, bytes], code: bytes = b"\x90" * 64) -> bytes:
    """A 64-bit little-endian ELF file with these sections (and .shstrtab)."""
    names = [*sections, ".shstrtab"]
    shstrtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    blobs = [*sections.values(), shstrtab]
    body = bytearray(code)
    placed = []
    for blob in blobs:
        placed.append((64 + len(body), len(blob)))
        body += blob
    table_at = 64 + len(body)
    header = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0, 0, table_at, 0, 64, 0, 0, 64,
                            len(names) + 1, len(names)))
    table = bytearray(b"\0" * 64)  # section 0: SHN_UNDEF
    name_at = 1
    for name, (offset, size) in zip(names, placed, strict=True):
        table += struct.pack("<IIQQQQIIQQ", name_at, 1, 0, 0, offset, size, 0, 0, 1, 0)
        name_at += len(name) + 1
    return header + bytes(body) + bytes(table)


def test_elf_section_reads_the_marker_and_nothing_else(tmp_path: Path):
    path = tmp_path / "plugin"
    path.write_bytes(elf({".text": b"\xc3" * 16, ".nodeproxy_cni": MARKER}))
    assert install.elf_section(path, ".nodeproxy_cni") == MARKER
    assert install.elf_section(path, ".text") == b"\xc3" * 16
    assert install.elf_section(path, ".nodeproxy") is None  # a prefix is not a match
    assert install.installed_by_us(path)


@pytest.mark.parametrize("content", [
    pytest.param(elf({".text": b"\xc3"}), id="an-elf-without-marker"),
    pytest.param(elf({".nodeproxy_cni": b'{"installedBy": "someone-else"}'}), id="foreign-marker"),
    pytest.param(elf({".nodeproxy_cni": b"not json"}), id="garbage-marker"),
    pytest.param(elf({".nodeproxy_cni": b'["installedBy"]'}), id="marker-not-an-object"),
    pytest.param(elf({".nodeproxy_cni": MARKER + b" " * 5000}), id="oversized-marker"),
    pytest.param(elf({".nodeproxy_cni": MARKER})[:100], id="truncated"),
    pytest.param(b"\x7fELF\x01\x01" + b"\0" * 80, id="32-bit-header"),
    pytest.param(b"#!/bin/sh\nexit 0\n", id="a-script"),
    pytest.param(b"", id="empty"),
])
def test_files_without_our_marker_are_not_ours(tmp_path: Path, content: bytes):
    path = tmp_path / "nodeproxy-cni"
    path.write_bytes(content)
    assert not install.installed_by_us(path)


def test_a_section_table_pointing_past_the_end_is_not_ours(tmp_path: Path):
    data = bytearray(elf({".nodeproxy_cni": MARKER}))
    struct.pack_into("<Q", data, 0x28, len(data) + 4096)  # e_shoff beyond the file
    path = tmp_path / "nodeproxy-cni"
    path.write_bytes(bytes(data))
    assert not install.installed_by_us(path)


def test_install_executable_copies_once_with_mode_0755(tmp_path: Path):
    source = tmp_path / "built"
    source.write_bytes(elf({".nodeproxy_cni": MARKER}))
    bin_dir = tmp_path / "opt" / "cni" / "bin"
    target, changed = install.install_executable(bin_dir, source)
    assert changed and target == bin_dir / "nodeproxy-cni"
    assert target.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    mtime = target.stat().st_mtime_ns
    assert install.install_executable(bin_dir, source) == (target, False)
    assert target.stat().st_mtime_ns == mtime
    # A new build replaces it; no temporary file is left beside it.
    source.write_bytes(elf({".nodeproxy_cni": MARKER, ".text": b"\xc3"}))
    assert install.install_executable(bin_dir, source) == (target, True)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in bin_dir.iterdir()) == ["nodeproxy-cni"]


def test_an_unmarked_source_is_refused_and_nothing_is_written(tmp_path: Path):
    source = tmp_path / "python-script"
    source.write_text("#!/usr/bin/env python3\n")
    bin_dir = tmp_path / "bin"
    with pytest.raises(install.InstallError, match="make cni-plugin"):
        install.install_executable(bin_dir, source)
    assert not bin_dir.exists()


def test_main_copies_the_executable_by_default_and_says_why_it_cannot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "10-bridge.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}))
    bin_dir = tmp_path / "bin"
    missing = tmp_path / "no-such-plugin"
    assert install.main(["--bin-dir", str(bin_dir), "--conf-dir", str(conf),
                         "--plugin", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not bin_dir.exists()
    assert "nodeproxy-cni" not in (conf / "10-bridge.conflist").read_text()

    built = tmp_path / "built"
    built.write_bytes(elf({".nodeproxy_cni": MARKER}))
    assert install.main(["--bin-dir", str(bin_dir), "--conf-dir", str(conf),
                         "--plugin", str(built)]) == 0
    assert (bin_dir / "nodeproxy-cni").read_bytes() == built.read_bytes()
    plugins = json.loads((conf / "10-bridge.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "nodeproxy-cni"]


def test_uninstall_removes_an_installed_executable_but_not_a_foreign_one(tmp_path: Path):
    built = tmp_path / "built"
    built.write_bytes(elf({".nodeproxy_cni": MARKER}))
    bin_dir = tmp_path / "bin"
    target, _ = install.install_executable(bin_dir, built)
    assert uninstall.remove_cni(None, str(bin_dir)) == [f"removed {target}"]
    assert not target.exists()
    target.write_bytes(elf({".text": b"\xc3"}))  # someone else's nodeproxy-cni
    lines = uninstall.remove_cni(None, str(bin_dir))
    assert target.exists() and "not installed by" in lines[0]
