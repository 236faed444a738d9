"""Run a DaemonSet's containers with podman the way the kubelet would, on a simulated node.

``container_argv`` turns one container of a pod template (command, args, env,
securityContext, volumeMounts, resources) into a ``podman run`` command line; the
pod's volumes become bind mounts of host directories chosen by the caller
(``hostPath`` volumes: the host path as is, or a test directory standing in for
it; ``configMap``, ``secret`` and ``emptyDir``: a directory the caller filled).
The pod's ``hostNetwork`` is the simulated node's network namespace.  A field
this module does not know is an error, so a manifest change is never silently
dropped from the test.

``Podman`` runs podman on a container store of its own (``--root``/``--runroot``
under a test directory): images it loads and containers it runs never touch the
machine's store, and ``reset()`` removes them all.

What this machine needs beyond the manifest (see docs/install.md, "Image"):
``--runtime runc`` (crun refuses a hybrid cgroup layout whose v2 hierarchy has
controllers), explicit ulimits (podman's defaults need CAP_SYS_RESOURCE to raise
the hard limits), and a ``--cgroup-parent`` of the test's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# volumeMount.mountPropagation -> podman's bind propagation
_PROPAGATION = {None: None, "None": None, "HostToContainer": "rslave",
                "Bidirectional": "rshared"}
_SECURITY_KEYS = {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                  "runAsUser", "capabilities", "seccompProfile", "appArmorProfile"}
_CONTAINER_KEYS = {"name", "image", "command", "args", "env", "securityContext", "resources",
                   "volumeMounts", "ports", "startupProbe", "readinessProbe", "livenessProbe",
                   "lifecycle"}
_MOUNT_KEYS = {"name", "mountPath", "readOnly", "mountPropagation"}


class ManifestError(ValueError):
    """The pod template has something this translation does not know."""


@dataclass(frozen=True)
class Volume:
    """Where a pod volume comes from on this machine."""

    source: str       # host directory bound into the container
    tmpfs_size: str | None = None  # emptyDir medium Memory: a tmpfs of this size instead


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``256Mi``, ``1Gi``, ``64M``, ``1000``) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity (``2``, ``100m``) in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def env_values(container: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, str]:
    """The container's env: plain values, and fieldRef values from ``fields``
    (``spec.nodeName`` -> the node's name, ...)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        path = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if path not in fields:
            raise ManifestError(f"env {item['name']}: no value for {item.get('valueFrom')}")
        env[item["name"]] = fields[path]
    return env


def security_argv(context: Mapping[str, Any]) -> list[str]:
    """podman options for a container securityContext."""
    unknown = set(context) - _SECURITY_KEYS
    if unknown:
        raise ManifestError(f"securityContext: unknown {sorted(unknown)}")
    argv: list[str] = []
    if context.get("privileged"):
        argv.append("--privileged")
    if "runAsUser" in context:
        argv += ["--user", str(context["runAsUser"])]
    if context.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if context.get("readOnlyRootFilesystem"):
        # Exactly the manifest: no tmpfs on /tmp, /run, /var/tmp besides its own mounts.
        argv += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = context.get("capabilities", {})
    for cap in capabilities.get("drop", []):
        argv += ["--cap-drop", cap.lower()]
    for cap in capabilities.get("add", []):
        argv += ["--cap-add", cap.lower()]
    seccomp = context.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise ManifestError(f"seccompProfile {seccomp}: only RuntimeDefault and Unconfined")
    apparmor = context.get("appArmorProfile", {}).get("type", "RuntimeDefault")
    if apparmor == "Unconfined":
        argv += ["--security-opt", "apparmor=unconfined"]
    elif apparmor != "RuntimeDefault":
        raise ManifestError(f"appArmorProfile {apparmor}: only RuntimeDefault and Unconfined")
    return argv


def mount_argv(mount: Mapping[str, Any], volume: Volume) -> list[str]:
    """podman options for one volumeMount of a volume."""
    unknown = set(mount) - _MOUNT_KEYS
    if unknown:
        raise ManifestError(f"volumeMount {mount['name']}: unknown {sorted(unknown)}")
    if volume.tmpfs_size:
        return ["--tmpfs", f"{mount['mountPath']}:rw,size={volume.tmpfs_size}"]
    propagation = mount.get("mountPropagation")
    if propagation not in _PROPAGATION:
        raise ManifestError(f"volumeMount {mount['name']}: mountPropagation {propagation}")
    options = ["ro" if mount.get("readOnly") else "rw", "rbind"]
    if _PROPAGATION[propagation]:
        options.append(_PROPAGATION[propagation])
    return ["--volume", f"{volume.source}:{mount['mountPath']}:{','.join(options)}"]


def container_argv(container: Mapping[str, Any], pod_spec: Mapping[str, Any], *,
                   image: str, name: str, volumes: Mapping[str, Volume],
                   fields: Mapping[str, str], network: str,
                   machine: Sequence[str] = ()) -> list[str]:
    """``podman run`` options (without ``podman`` and the store options) that start
    ``container`` of ``pod_spec`` from ``image`` as the kubelet would, its
    hostNetwork being the namespace at ``network``; ``machine`` adds what this
    machine needs (runtime, ulimits, cgroup parent)."""
    unknown = set(container) - _CONTAINER_KEYS
    if unknown:
        raise ManifestError(f"container {container['name']}: unknown {sorted(unknown)}")
    argv = ["run", "--name", name, *machine]
    if pod_spec.get("hostNetwork"):
        argv += ["--network", f"ns:{network}"]
    else:
        raise ManifestError("only hostNetwork pods run on the simulated node")
    if pod_spec.get("hostPID"):
        argv += ["--pid", "host"]
    for key, value in env_values(container, fields).items():
        argv += ["--env", f"{key}={value}"]
    argv += security_argv(container.get("securityContext", {}))
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            raise ManifestError(f"volumeMount {mount['name']}: no such volume")
        argv += mount_argv(mount, volumes[mount["name"]])
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        argv += ["--memory", str(memory_bytes(limits["memory"]))]
    if "cpu" in limits:
        argv += ["--cpus", str(cpus(limits["cpu"]))]
    grace = pod_spec.get("terminationGracePeriodSeconds")
    if grace is not None:
        argv += ["--stop-timeout", str(grace)]
    if "command" in container:
        argv += ["--entrypoint", json.dumps(container["command"])]
    return [*argv, image, *container.get("args", [])]


def machine_argv(cgroup_parent: str) -> list[str]:
    """What podman needs on this kind of machine, whatever the manifest says."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 20
    if nproc == resource.RLIM_INFINITY or nproc > pid_max:
        nproc = pid_max
    return ["--runtime", "runc", "--ulimit", f"nofile={nofile}:{nofile}",
            "--ulimit", f"nproc={nproc}:{nproc}", "--cgroup-parent", cgroup_parent]


class Podman:
    """podman on a store of its own under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.base = ["podman", "--root", str(self.directory / "root"),
                     "--runroot", str(self.directory / "run"), "--storage-driver", "overlay"]

    def run(self, argv: Sequence[str], *, timeout: float = 120.0, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.base, *argv], capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(argv[:3])}: exit {result.returncode}: "
                               f"{result.stderr.strip()[-2000:]}")
        return result

    def load(self, archive: str | os.PathLike[str]) -> str:
        """Load an image archive; its name as podman lists it."""
        out = self.run(["load", "--quiet", "--input", str(archive)], timeout=600).stdout
        return out.strip().rsplit(": ", 1)[-1].splitlines()[-1]

    def logs(self, name: str) -> str:
        result = self.run(["logs", name], check=False)
        return (result.stdout + result.stderr)[-6000:]

    def remove(self, name: str) -> None:
        self.run(["rm", "--force", "--time", "5", name], check=False, timeout=60)

    def reset(self) -> None:
        """Remove every container and image of this store, then the store itself."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run(["system", "reset", "--force"], check=False, timeout=300)
        shutil.rmtree(self.directory, ignore_errors=True)
