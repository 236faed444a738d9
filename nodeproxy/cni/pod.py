"""Who the pod is: names from CNI_ARGS, identity and labels from hints, its cgroup, its IPs.

Sources, first one wins:

- namespace and name: CNI_ARGS ``K8S_POD_NAMESPACE`` / ``K8S_POD_NAME`` (kubelet's
  runtimes always pass them);
- service account and labels: the netconf's ``args.cni.serviceAccount`` /
  ``args.cni.labels``, then CNI_ARGS ``NODEPROXY_SERVICE_ACCOUNT`` /
  ``NODEPROXY_LABELS`` (``key:value,key:value``; CNI_ARGS values may hold no
  ``=`` or ``;``), then the Kubernetes lookup hook (``kubeapi.LOOKUP_POD``), then
  ``default`` and no labels;
- cgroup: ``args.cni.cgroup``, then CNI_ARGS ``NODEPROXY_CGROUP``, then, on a real
  node, the kubelet's pod cgroup found from ``K8S_POD_UID`` under the cgroup v2
  mount (``kubepods.slice/.../kubepods-<qos>-pod<uid>.slice`` with the systemd
  driver, ``kubepods/<qos>/pod<uid>`` with cgroupfs);
- IPs: the ``ips`` of the previous plugin's result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nodeproxy.cni import kubeapi
from nodeproxy.cni.netconf import NetConf
from nodeproxy.cni.spec import (
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    POD_CGROUP_UNKNOWN,
    CniError,
)

# A pod (or its namespace, once discovery reads namespaces) labelled so stays out of the mesh.
DATAPLANE_MODE_LABEL = "nodeproxy.io/dataplane-mode"
DATAPLANE_MODE_NONE = "none"
KUBEPODS_NAMES = ("kubepods.slice", "kubepods")


@dataclass(frozen=True)
class PodInfo:
    """A pod as the plugin sees it before asking the daemon."""

    namespace: str
    name: str
    uid: str | None
    service_account: str
    labels: dict[str, str]
    cgroup_hint: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_names(cni_args: dict[str, str]) -> tuple[str, str] | None:
    """(namespace, name) from CNI_ARGS, or None when the runtime did not say."""
    namespace, name = cni_args.get("K8S_POD_NAMESPACE"), cni_args.get("K8S_POD_NAME")
    if namespace and name:
        return namespace, name
    return None


def parse_labels(text: str) -> dict[str, str]:
    """'app:web,tier:front' -> {'app': 'web', 'tier': 'front'}."""
    labels: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT,
                           f"CNI_ARGS NODEPROXY_LABELS: {item!r} is not key:value")
        labels[key] = value
    return labels


def pod_info(conf: NetConf, cni_args: dict[str, str]) -> PodInfo:
    """Everything known about the pod being added; a CniError when it cannot be named."""
    names = pod_names(cni_args)
    if names is None:
        raise CniError(INVALID_ENVIRONMENT,
                       "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME: "
                       "nodeproxy-cni enrolls Kubernetes pods only")
    namespace, name = names
    hints = conf.hints
    labels = hints.get("labels")
    if labels is not None and (not isinstance(labels, dict) or
                               not all(isinstance(v, str) for v in labels.values())):
        raise CniError(INVALID_NETWORK_CONFIG,
                       "network configuration: 'args.cni.labels' must map strings to strings")
    if labels is None and "NODEPROXY_LABELS" in cni_args:
        labels = parse_labels(cni_args["NODEPROXY_LABELS"])
    service_account = hints.get("serviceAccount") or cni_args.get("NODEPROXY_SERVICE_ACCOUNT")
    if labels is None or service_account is None:
        found = kubeapi.LOOKUP_POD(namespace, name)
        if found is not None:
            labels = found.labels if labels is None else labels
            service_account = service_account or found.service_account
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=cni_args.get("K8S_POD_UID"),
        service_account=str(service_account or "default"),
        labels=dict(labels or {}),
        cgroup_hint=hints.get("cgroup") or cni_args.get("NODEPROXY_CGROUP"),
    )


def skip_reason(conf: NetConf, pod: PodInfo) -> str | None:
    """Why this pod stays out of the mesh, or None when it is to be enrolled."""
    if pod.namespace in conf.exclude_namespaces:
        return f"namespace {pod.namespace} is in excludeNamespaces"
    if pod.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_NONE:
        return f"label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE}"
    return None


def result_ips(prev_result: dict[str, Any]) -> list[str]:
    """The pod's addresses (no prefix length) from the previous plugin's result."""
    ips = []
    for entry in prev_result.get("ips") or []:
        address = entry.get("address") if isinstance(entry, dict) else None
        if isinstance(address, str) and address:
            ips.append(address.split("/")[0])
    return ips


def find_cgroup2_root(proc_mounts: str = "/proc/mounts") -> str | None:
    """The first cgroup2 mount point listed in /proc/mounts."""
    try:
        with open(proc_mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return fields[1].replace("\\040", " ")
    except OSError:
        return None
    return None


def pod_cgroup_from_uid(cgroup_root: str, uid: str) -> str | None:
    """The kubelet's cgroup of the pod with this UID (systemd or cgroupfs driver), or None."""
    cgroupfs_name = f"pod{uid}"
    systemd_suffix = f"-pod{uid.replace('-', '_')}.slice"
    for base in KUBEPODS_NAMES:
        top = os.path.join(cgroup_root, base)
        # Guaranteed pods sit right under kubepods, burstable/besteffort one level down.
        level = [top]
        for _depth in range(2):
            below = []
            for directory in level:
                try:
                    entries = os.listdir(directory)
                except OSError:
                    continue
                for entry in entries:
                    path = os.path.join(directory, entry)
                    if (entry == cgroupfs_name or entry.endswith(systemd_suffix)) and \
                            os.path.isdir(path):
                        return path
                    if entry.startswith("kubepods") or entry in ("burstable", "besteffort"):
                        below.append(path)
            level = below
    return None


def pod_cgroup(conf: NetConf, pod: PodInfo) -> str:
    """The cgroup v2 directory of the pod's processes, or a CniError saying why it is unknown."""
    if pod.cgroup_hint:
        return str(pod.cgroup_hint)
    root = conf.cgroup_root or find_cgroup2_root()
    if pod.uid and root:
        found = pod_cgroup_from_uid(root, pod.uid)
        if found:
            return found
    raise CniError(POD_CGROUP_UNKNOWN, f"cannot tell the cgroup of pod {pod.key}",
                   f"no args.cni.cgroup or CNI_ARGS NODEPROXY_CGROUP, and no kubelet pod "
                   f"cgroup for K8S_POD_UID={pod.uid or '(not given)'} under "
                   f"{root or '(no cgroup2 mount)'}")


def workload(pod: PodInfo, netns: str, cgroup: str, ips: list[str]) -> dict[str, Any]:
    """The control socket's POST /v1/pods body (the node YAML's workload shape, camelCase)."""
    return {
        "name": pod.name,
        "namespace": pod.namespace,
        "serviceAccount": pod.service_account,
        "labels": pod.labels,
        "netns": netns,
        "cgroup": cgroup,
        "ips": ips,
    }
