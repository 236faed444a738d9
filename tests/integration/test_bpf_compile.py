"""The program set compiles and passes the verifier whatever the order of its sources, and
what bcc compiles is the daemon's view of bpf/maps.h (nodeproxy/capture/contract.py).

bcc makes programs only of functions in its main text, so bpf/*.c are concatenated into
one; each includes common.h, which declares what one source uses of another.  Each order
below puts a different source first and last; without common.h's declarations a source
that uses another's function or map before its definition fails to compile.
Root and bcc: this compiles and loads the real programs (never attaches them); their
pinned maps go to a scratch directory in bpffs, removed afterwards.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeproxy.capture import bpf_build, contract, kernelfs

pytestmark = pytest.mark.privileged

ROTATIONS = [bpf_build.SOURCES[i:] + bpf_build.SOURCES[:i]
             for i in range(len(bpf_build.SOURCES))]
ORDERS = [*ROTATIONS[1:], tuple(reversed(bpf_build.SOURCES))]


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(kernelfs.DEFAULT_BPFFS) / f"nodeproxy-test-compile-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def compiled(maps_dir: Path, sources: tuple[str, ...] = bpf_build.SOURCES) -> Any:
    import bcc

    return bpf_build.compile_programs(bcc, maps_dir, sources=sources)


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_the_sources_compile_and_load_in_another_order(scratch: Path, order: tuple[str, ...]):
    bpf = compiled(scratch, order)
    try:
        for spec in bpf_build.ALL_PROGRAMS:
            bpf_build.load_program(bpf, spec)  # the verifier runs here
        contract.check_compiled(bpf)
    finally:
        bpf.cleanup()


def test_the_compiled_maps_are_the_contracts_and_the_pinned_ones_are_pinned(scratch: Path):
    bpf = compiled(scratch)
    try:
        contract.check_compiled(bpf)
        assert sorted(os.listdir(scratch)) == sorted(s.name for s in contract.MAPS if s.pinned)
        for spec in contract.MAPS:
            assert contract.map_fd(bpf, spec) >= 0, spec.name
    finally:
        bpf.cleanup()


def test_a_python_view_that_differs_from_what_bcc_compiled_is_refused(scratch: Path):
    class Narrower(ctypes.Structure):
        _fields_ = [("pod_id", ctypes.c_uint16), ("flags", ctypes.c_uint16)]

    bpf = compiled(scratch)
    try:
        narrowed = tuple(dataclasses.replace(s, value=Narrower) if s is contract.PODS else s
                         for s in contract.MAPS)
        for view, complaint in ((narrowed, "pods value"),
                                (contract.MAPS[:-1], "np_msg_settings")):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(contract, "MAPS", view)
                with pytest.raises(contract.ContractMismatch, match=complaint):
                    contract.check_compiled(bpf)
    finally:
        bpf.cleanup()


def test_nodeproxy_check_reports_a_view_that_differs(monkeypatch: pytest.MonkeyPatch):
    import bcc

    from nodeproxy.capture import preflight

    assert preflight.check_capture_program(bcc).ok
    monkeypatch.setattr(contract, "MAPS", contract.MAPS[:-1])
    result = preflight.check_capture_program(bcc)
    assert not result.ok and "np_msg_settings" in result.detail, result
    assert not os.path.exists(f"{kernelfs.DEFAULT_BPFFS}/nodeproxy-preflight-{os.getpid()}")
