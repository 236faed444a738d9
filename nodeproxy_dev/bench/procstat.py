"""CPU seconds and resident memory of processes (from /proc), and the machine the run is on."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def user_system(pid: int) -> tuple[float, float]:
    """utime and stime of the process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based) -> 11, 12 here.
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    user, system = user_system(pid)
    return user + system


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon: private heap; RssFile: mapped files such as
    libraries; RssShmem) of the process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    if "VmRSS" not in out:
        raise OSError(f"process {pid} has no VmRSS (a zombie?)")
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of the process in KiB."""
    return memory_kib(pid)["VmRSS"]


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def raise_nofile(pid: int, limit: int) -> str:
    """Raise the open-file limit of a process towards ``limit``; say what was done.

    The hard limit is raised too where the caller may (CAP_SYS_RESOURCE); else the
    soft limit goes up to the hard one.
    """
    soft, hard = _nofile(pid)
    if soft >= limit:
        return f"pid {pid}: nofile {soft} already enough"
    for new_soft, new_hard in ((limit, max(hard, limit)), (min(limit, hard), hard)):
        result = subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={new_soft}:{new_hard}"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return f"pid {pid}: nofile raised from {soft}:{hard} to {new_soft}:{new_hard}"
    return f"pid {pid}: nofile stays {soft}:{hard}"


def lift_own_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's open-file limit (children inherit it): hard to ``wanted`` if
    permitted, soft to the hard limit.  Returns the (soft, hard) limits in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft, hard = wanted, wanted
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return int(parts[3]), int(parts[4])
    raise OSError(f"no open-file limit for process {pid}")


def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (result.stdout + result.stderr).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.splitlines()[0].strip() if text else "unknown"


def tool_versions() -> dict[str, str]:
    """The first line of each external tool's version output."""
    return {
        "iperf3": _first_line(["iperf3", "--version"]),
        "sockperf": _first_line(["sockperf", "--version"]).removeprefix("sockperf: "),
        "wrk": _first_line(["wrk", "--version"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _commit(repo: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def machine(repo: str) -> dict[str, Any]:
    """Kernel, CPU model, cores, memory, Python, tool versions and the code's commit."""
    return {
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_mib": _memory_mib(),
        "python": platform.python_version(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "tools": tool_versions(),
        "commit": _commit(repo),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for the README: kernel, CPU, cores, memory."""
    return (f"kernel {info['kernel']}, {info['cpu_model']}, {info['cores']} cores, "
            f"{info['memory_mib'] / 1024:.1f} GiB RAM, {info['os']}")
