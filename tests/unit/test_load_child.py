"""What the daemon makes of the loading child's answer (no root, no bcc): descriptors by
name, the child's errors raised again with their type and the end of its stderr, and no
descriptor left open when the answer is refused."""

from __future__ import annotations

import json
import os
import socket

import pytest

from nodeproxy.capture import contract, load_child
from nodeproxy.capture.map_access import MapSet

VERIFIER_LOG = "\n".join(f"{i}: (61) r0 = *(u32 *)(r1 +0)" for i in range(100)) + (
    "\nR1 invalid mem access 'scalar'\nprocessed 3 insns\n")


def pipes(n: int) -> list[int]:
    fds = []
    for _ in range(n):
        fds.extend(os.pipe())
    return fds[:n]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_an_answer_names_each_descriptor():
    fds = pipes(3)
    answer = {"programs": ["connect4"], "maps": ["pods", "np_msg_sockets"], "seconds": 1.5}
    loaded = load_child._received(json.dumps(answer).encode(), fds, 0, 0, "")
    try:
        assert loaded.programs == {"connect4": fds[0]}
        assert loaded.maps == {"pods": fds[1], "np_msg_sockets": fds[2]}
        assert loaded.seconds == 1.5
    finally:
        for fd in fds:
            os.close(fd)


def test_a_verifier_refusal_carries_bccs_message_and_the_end_of_the_log():
    error = {"kind": "Exception",
             "error": "Failed to load BPF program b'np_connect4': Permission denied"}
    with pytest.raises(load_child.ProgramLoadError) as refused:
        load_child._received(json.dumps(error).encode(), [], 0, 1, VERIFIER_LOG)
    message = str(refused.value)
    assert message.startswith(error["error"])
    assert "R1 invalid mem access 'scalar'" in message
    # The end of the log, not all of it.
    assert len(message.splitlines()) == 1 + load_child.LOG_TAIL_LINES


@pytest.mark.parametrize(("kind", "raised"), [
    ("ContractMismatch", contract.ContractMismatch),
    ("FileNotFoundError", FileNotFoundError),
    ("ModuleNotFoundError", load_child.ProgramLoadError),
])
def test_the_childs_error_keeps_the_type_callers_catch(kind: str, raised: type):
    with pytest.raises(raised, match="what went wrong"):
        load_child._received(json.dumps({"kind": kind, "error": "what went wrong"}).encode(),
                             [], 0, 1, "")


def test_a_child_that_died_without_answering_is_an_error_with_its_output():
    with pytest.raises(load_child.ProgramLoadError, match=r"exited \(-9\)[\s\S]*oom"):
        load_child._received(b"", [], 0, -9, "killed: oom\n")


@pytest.mark.parametrize(("answer", "count", "flags"), [
    ({"programs": ["connect4"], "maps": ["pods"]}, 1, 0),  # one descriptor short
    ({"programs": ["connect4"], "maps": []}, 1, socket.MSG_CTRUNC),  # cut by the kernel
    ({"kind": "Exception", "error": "refused"}, 2, 0),  # an error never keeps what came
])
def test_a_refused_answer_closes_every_descriptor_it_came_with(answer, count, flags):
    fds = pipes(count)
    with pytest.raises(Exception):  # noqa: B017 - each case its own error; the fds matter
        load_child._received(json.dumps(answer).encode(), fds, flags, 0, "")
    assert not any(is_open(fd) for fd in fds)


def test_a_map_outside_the_contract_is_refused_and_open_names_the_missing_one():
    with pytest.raises(KeyError, match="not_a_map"):
        MapSet({"not_a_map": -1})
    maps = MapSet({})
    with pytest.raises(KeyError, match="pods"):
        maps.open(contract.PODS)
