"""Compile and load the capture programs in a short-lived child process, so the daemon
never maps bcc's LLVM and clang (most of what bcc costs in memory).

The daemon (`load_in_child`) starts ``python -m nodeproxy.capture.load_child`` with one
end of a Unix socket pair.  The child compiles bpf/*.c with bcc (bpf_build), checks the
maps against contract.py, loads the capture mode's programs (the verifier runs here),
attaches the sk_skb and sk_msg verdicts to their sockhashes (a map attachment lives as
long as the map), then sends the daemon a descriptor of each program and each map with
SCM_RIGHTS, and exits.  The daemon holds them from then on exactly as it held bcc's:

- the shared maps are pinned by bcc at creation under <bpffs>/nodeproxy/<node>/maps/
  (BPF_TABLE_PINNED), or found there again when another instance made them;
- the per-instance maps (splice and sk_msg sockhashes, splice_flows, ...) are pinned
  nowhere: they live as long as the daemon's descriptors and programs, so they leave
  nothing behind when the daemon exits, however it exits.

A failure in the child (a compile error, the verifier's refusal, a missing kernel
feature, a map that differs from contract.py) comes back as the exception the daemon
raised when it loaded the programs itself, with what bcc wrote to stderr (the verifier's
log) in its message; that output is also copied to the daemon's stderr, as before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeproxy.capture import bpf_build, contract

# Descriptors one message carries (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 200
MESSAGE_SIZE = 1 << 16
LOAD_TIMEOUT_SECONDS = 600.0
# How much of the child's stderr (the end of the verifier's log) goes into the error.
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class LoadRequest:
    maps_dir: str  # the node's shared-map pin directory
    mode: str
    outbound_port: int
    inbound_port: int
    hbone_port: int


@dataclass
class LoadedObjects:
    """Descriptors the daemon now owns: programs by spec name, maps by contract name."""

    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # the child's compile and load


class ProgramLoadError(Exception):
    """The child could not compile or load the programs (bcc raises a bare Exception; this
    carries its message and the verifier's log)."""


# Exceptions that keep their type across the process boundary (callers catch them).
_KINDS: dict[str, type[BaseException]] = {
    "ContractMismatch": contract.ContractMismatch,
    "FileNotFoundError": FileNotFoundError,
    "ValueError": ValueError,
}


def _error(kind: str, message: str) -> BaseException:
    return _KINDS.get(kind, ProgramLoadError)(message)


# -- the daemon's side ---------------------------------------------------------------------


def load_in_child(request: LoadRequest) -> LoadedObjects:
    """Compile and load in a child; returns the descriptors it sent.  Raises what the
    load raised (ProgramLoadError for bcc's and the verifier's errors)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The child's output in memory (no file system needed: the root may be read-only).
    with ours, open(os.memfd_create("nodeproxy-load-child"), "w+b") as stderr:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()),
                 json.dumps(request.__dict__)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            theirs.close()
        try:
            ours.settimeout(LOAD_TIMEOUT_SECONDS)
            message, fds, flags, _ = socket.recv_fds(ours, MESSAGE_SIZE, MAX_FDS)
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            child_status = child.wait()
        stderr.seek(0)
        output = stderr.read().decode(errors="replace")
    if output:
        sys.stderr.write(output)  # bcc's warnings and the verifier's log, as before
    return _received(message, fds, flags, child_status, output)


def _received(message: bytes, fds: list[int], flags: int, status: int,
              output: str) -> LoadedObjects:
    try:
        if not message:
            raise ProgramLoadError(f"the loading child exited ({status}) without an answer"
                                   + _tail(output))
        answer = json.loads(message)
        if "error" in answer:
            raise _error(answer["kind"], answer["error"] + _tail(output))
        if flags & socket.MSG_CTRUNC:
            raise ProgramLoadError("the loading child's descriptors were cut short")
        names = [("programs", n) for n in answer["programs"]] + [
            ("maps", n) for n in answer["maps"]]
        if len(names) != len(fds):
            raise ProgramLoadError(f"the loading child sent {len(fds)} descriptors for "
                                   f"{len(names)} objects")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    loaded = LoadedObjects(seconds=float(answer.get("seconds", 0.0)))
    for (kind, name), fd in zip(names, fds, strict=True):
        getattr(loaded, kind)[name] = fd
    return loaded


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return "\n" + "\n".join(lines[-LOG_TAIL_LINES:])


# -- the child -----------------------------------------------------------------------------


def load(bcc: Any, request: LoadRequest) -> tuple[dict[str, int], dict[str, int], Any]:
    """Compile, check and load in this process: (program fds, map fds, the bcc.BPF that
    owns them)."""
    bpf = bpf_build.compile_programs(
        bcc, Path(request.maps_dir), outbound_port=request.outbound_port,
        inbound_port=request.inbound_port, hbone_port=request.hbone_port)
    contract.check_compiled(bpf)  # the daemon's view of every map is the C one
    map_fds = {spec.name: contract.map_fd(bpf, spec) for spec in contract.MAPS}
    programs = {}
    for spec in bpf_build.mode_programs(request.mode):
        function = bpf_build.load_program(bpf, spec)
        sockhash = bpf_build.MAP_ATTACHED.get(spec.name)
        if sockhash is None:
            programs[spec.name] = function.fd
        else:  # the verdict runs on the sockets in this instance's own sockhash
            bcc.BPF.attach_func(function, map_fds[sockhash], spec.attach_type)
    return programs, map_fds, bpf


def child_main(sock_fd: int, request_json: str) -> int:
    """Load as the daemon asked and answer on sock_fd; exits the process."""
    import time

    started = time.monotonic()
    with socket.socket(fileno=sock_fd) as sock:
        try:
            import bcc  # Debian's python3-bpfcc: the build tool, here and only here

            programs, maps, bpf = load(bcc, LoadRequest(**json.loads(request_json)))
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            sys.stderr.flush()
            sock.send(json.dumps({"kind": type(e).__name__, "error": str(e)}).encode())
            return 1
        answer = {"programs": list(programs), "maps": list(maps),
                  "seconds": round(time.monotonic() - started, 3)}
        socket.send_fds(sock, [json.dumps(answer).encode()],
                        [*programs.values(), *maps.values()])
    # The daemon has its own descriptors and waits for this exit: skip bcc's and LLVM's
    # teardown (the kernel releases what this process held; pins stay, as with cleanup()).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), sys.argv[2]))
