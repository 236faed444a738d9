"""Kubernetes objects (the API's JSON, as dicts) -> the node model's Workload and Service.

Pure functions, no I/O.  What is kept and what is skipped:

- Pod -> ``Workload``: name, namespace, ``spec.serviceAccountName`` -> serviceAccount,
  labels, ``status.podIPs`` (else ``status.podIP``) -> ips, ``spec.nodeName`` -> node.
  Skipped (``None``): pods without an IP or a node yet, pods in phase Succeeded or Failed (their IP
  may already belong to another pod), ``hostNetwork`` pods (they share the node's IP and
  are not captured).
- Service -> ``Service``: ``spec.clusterIPs`` -> vips, TCP ports with ``targetPort`` when
  it is a number (a named targetPort is resolved through the EndpointSlices' ports, when
  they all agree on one number), each port's ``app_protocol`` (below), and the ready
  EndpointSlice addresses as explicit endpoints. The Kubernetes selector is *not* carried:
  the EndpointSlice controller has already applied it, with readiness, and the node model
  would add every matching pod a second time, ready or not. A discovered service therefore
  has ``selector: {}`` (selects nothing), so one with no ready endpoint is still a known
  VIP that refuses connections instead of passing them through. Skipped: ExternalName
  services, headless services (no cluster IP: clients dial the pods), services with no TCP
  port.
- A port's ``appProtocol`` (``http``, ``http2``, ``grpc``, ``tcp``; also Kubernetes'
  ``kubernetes.io/h2c``) says what it speaks; without one, Istio's port-name convention
  (``http``, ``http-web``, ``grpc-api``, ``tcp-db``...) does.  Anything else: not declared,
  so the proxy sniffs it.
- EndpointSlice -> endpoints per service port: the first address of each endpoint whose
  ``conditions.ready`` is not false (nil means ready, as the API says), on the slice's
  port number for that service port's name, with ``nodeName``.  FQDN slices are skipped.
- Namespace -> its labels.

An object that Kubernetes accepts but the node model cannot hold (a pod name with a dot,
for instance: Kubernetes allows DNS subdomains, the model DNS labels) raises
``ConversionError``; callers log it and leave the object out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from nodeproxy.config.model import Service, ServiceEndpoint, ServicePort, Workload

KubeObject = Mapping[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class ConversionError(ValueError):
    """A Kubernetes object that is malformed or cannot be expressed in the node model."""


def object_key(obj: KubeObject) -> str | None:
    """``namespace/name`` (or ``name`` for cluster-scoped objects); None if it has no name."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        return None
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name


def trim(obj: KubeObject) -> dict[str, Any]:
    """The object without what discovery never reads (managedFields, annotations)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items()
            if k not in ("managedFields", "annotations")}
    return {**obj, "metadata": meta}


def _meta(obj: KubeObject) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        raise ConversionError("object has no metadata.name")
    return meta


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '-'}: {err['msg']}"
                     for err in e.errors())


# --- pods and namespaces ------------------------------------------------------------------

def pod_ips(pod: KubeObject) -> list[str]:
    """``status.podIPs`` (dual stack), else ``status.podIP``."""
    status = pod.get("status") or {}
    ips: list[str] = []
    for entry in status.get("podIPs") or []:
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        if isinstance(ip, str) and ip:
            ips.append(ip)
    if not ips and isinstance(status.get("podIP"), str) and status["podIP"]:
        ips = [status["podIP"]]
    return ips


def pod_to_workload(pod: KubeObject) -> Workload | None:
    """A running pod as a Workload; None for pods the mesh does not track (see module doc)."""
    meta = _meta(pod)
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if spec.get("hostNetwork"):
        return None
    if status.get("phase") in TERMINAL_PHASES:
        return None
    ips = pod_ips(pod)
    if not ips or not spec.get("nodeName"):
        return None  # no IP yet; or unscheduled (a Workload without a node means *this* one)
    namespace = meta.get("namespace") or "default"
    try:
        return Workload.model_validate({
            "name": meta["name"],
            "namespace": namespace,
            "service_account": spec.get("serviceAccountName") or spec.get("serviceAccount")
            or "default",
            "labels": _str_map(meta.get("labels")),
            "node": spec["nodeName"],
            "ips": ips,
        })
    except ValidationError as e:
        raise ConversionError(f"pod {namespace}/{meta['name']}: {_short(e)}") from e


def namespace_labels(namespace: KubeObject) -> dict[str, str]:
    """A Namespace's labels."""
    return _str_map(_meta(namespace).get("labels"))


# --- services and endpointslices ----------------------------------------------------------

def slices_of(service: KubeObject, slices: Iterable[KubeObject]) -> list[KubeObject]:
    """The EndpointSlices that belong to this service (label ``kubernetes.io/service-name``)."""
    meta = _meta(service)
    namespace = meta.get("namespace") or "default"
    return [s for s in slices
            if (s.get("metadata") or {}).get("namespace", "default") == namespace
            and ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            == meta["name"]]


def _tcp(protocol: object) -> bool:
    return protocol in (None, "TCP")


def _slice_port_numbers(port_name: str, slices: Iterable[KubeObject]) -> list[tuple[int, int]]:
    """(slice index, port number) for every slice that names this service port."""
    found = []
    for i, s in enumerate(slices):
        for p in s.get("ports") or []:
            if not isinstance(p, Mapping) or not _tcp(p.get("protocol")):
                continue
            number = p.get("port")
            if (p.get("name") or "") == port_name and isinstance(number, int) \
                    and 1 <= number <= 65535:
                found.append((i, number))
    return found


def target_port(port: KubeObject, slices: Iterable[KubeObject]) -> int | None:
    """A numeric targetPort as is; a named one through the slices, if they agree on one."""
    target = port.get("targetPort")
    if target is None:
        return port.get("port") if isinstance(port.get("port"), int) else None
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    numbers = {n for _, n in _slice_port_numbers(port.get("name") or "", slices)}
    return numbers.pop() if len(numbers) == 1 else None


def _ready_addresses(slice_: KubeObject) -> list[tuple[str, str | None]]:
    """(address, nodeName) of the slice's ready endpoints: the first address of each."""
    if slice_.get("addressType") not in ("IPv4", "IPv6"):
        return []
    out = []
    for ep in slice_.get("endpoints") or []:
        if not isinstance(ep, Mapping):
            continue
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        addresses = [a for a in ep.get("addresses") or [] if isinstance(a, str)]
        if not addresses:
            continue
        try:
            ipaddress.ip_address(addresses[0])
        except ValueError:
            continue
        out.append((addresses[0], ep.get("nodeName") or None))
    return out


def endpoints_by_port(ports: Iterable[KubeObject],
                      slices: Iterable[KubeObject]) -> dict[int, list[ServiceEndpoint]]:
    """Service port -> the ready endpoints serving it (address, backend port, node).

    A slice's port whose name is the service port's name gives the backend port number
    for that slice's endpoints (a named targetPort may resolve differently per slice).
    """
    slices = list(slices)
    out: dict[int, list[ServiceEndpoint]] = {}
    for port in ports:
        number = port.get("port")
        if not isinstance(number, int) or not _tcp(port.get("protocol")):
            continue
        seen: set[tuple[str, int]] = set()
        endpoints: list[ServiceEndpoint] = []
        for i, backend_port in _slice_port_numbers(port.get("name") or "", slices):
            for address, node in _ready_addresses(slices[i]):
                if (address, backend_port) in seen:
                    continue  # the same endpoint in two slices while they are rebalanced
                seen.add((address, backend_port))
                endpoints.append(ServiceEndpoint.model_validate(
                    {"address": address, "port": backend_port, "node": node,
                     "servicePort": number}))
        out[number] = endpoints
    return out


def service_vips(service: KubeObject) -> list[str]:
    """``spec.clusterIPs`` (else ``spec.clusterIP``), without "None" (headless)."""
    spec = service.get("spec") or {}
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    return [ip for ip in ips if isinstance(ip, str) and ip and ip != "None"]


_APP_PROTOCOLS = {"http": "http", "http2": "http2", "grpc": "grpc", "tcp": "tcp",
                  "kubernetes.io/h2c": "http2", "h2c": "http2", "grpc-web": "http"}


def app_protocol(port: KubeObject) -> str | None:
    """What the port speaks: its appProtocol, else the prefix of its name (Istio's rule:
    "<protocol>[-<suffix>]"); None when neither says (the proxy then sniffs)."""
    declared = port.get("appProtocol")
    if isinstance(declared, str) and declared.lower() in _APP_PROTOCOLS:
        return _APP_PROTOCOLS[declared.lower()]
    name = port.get("name")
    if isinstance(name, str) and name:
        return _APP_PROTOCOLS.get(name.lower().split("-", 1)[0])
    return None


def service_to_service(service: KubeObject, slices: Iterable[KubeObject]) -> Service | None:
    """A Service and its EndpointSlices as one node-model Service (None: not proxied)."""
    meta = _meta(service)
    namespace = meta.get("namespace") or "default"
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    vips = service_vips(service)
    ports = [p for p in spec.get("ports") or []
             if isinstance(p, Mapping) and _tcp(p.get("protocol"))]
    if not vips or not ports:
        return None
    own = slices_of(service, slices)
    try:
        by_port = endpoints_by_port(ports, own)
        endpoints = list(dict.fromkeys(e for port_endpoints in by_port.values()
                                       for e in port_endpoints))
        return Service.model_validate({
            "name": meta["name"],
            "namespace": namespace,
            "vips": vips,
            "ports": [ServicePort.model_validate({
                "port": p.get("port"), "target_port": target_port(p, own),
                "name": p.get("name") or None, "app_protocol": app_protocol(p)})
                for p in ports],
            "selector": {},
            "endpoints": endpoints,
        })
    except ValidationError as e:
        raise ConversionError(f"service {namespace}/{meta['name']}: {_short(e)}") from e
