"""The real CNI plugins, invoked exactly as a container runtime does.

One network per simulated node: a ``bridge`` plugin (the node's bridge, gateway
for the pods) with ``host-local`` IPAM over a dual-stack pair of ranges, chained
with ``loopback``.  ADD runs the plugins in order, each given the previous
one's result as ``prevResult``; CHECK runs them in order and DEL in reverse,
both with the final ADD result.  The plugins run inside the node's netns (so the bridge and the host
ends of the veths are created there), and host-local keeps its state in a
per-run ``dataDir`` so nothing is written under /var/lib/cni.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from nodeproxy_dev.testbed import netns

CNI_VERSION = "1.0.0"
DEFAULT_PLUGIN_DIR = "/usr/lib/cni"


class CniError(RuntimeError):
    """A plugin failed; message carries its error JSON or stderr."""


@dataclass
class CniNetwork:
    """One node's pod network: bridge + host-local (dual stack) + loopback."""

    name: str
    node_netns: str
    subnets: list[str]
    data_dir: str
    bridge: str = "cni0"
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    mtu: int = 1500
    extra_env: dict[str, str] = field(default_factory=dict)

    def conflist(self) -> dict[str, Any]:
        """The network configuration list a runtime would read from /etc/cni/net.d."""
        ranges = [[{"subnet": subnet}] for subnet in self.subnets]
        routes = [{"dst": "::/0" if ":" in subnet else "0.0.0.0/0"} for subnet in self.subnets]
        return {
            "cniVersion": CNI_VERSION,
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "mtu": self.mtu,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.data_dir,
                        "ranges": ranges,
                        "routes": routes,
                    },
                },
                {"type": "loopback"},
            ],
        }

    def _invoke(self, plugin: dict[str, Any], command: str, container_id: str, netns_path: str,
                ifname: str, prev_result: dict[str, Any] | None) -> dict[str, Any] | None:
        conf = {"cniVersion": CNI_VERSION, "name": self.name, **plugin}
        if prev_result is not None:
            conf["prevResult"] = prev_result
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.plugin_dir,
            **self.extra_env,
        }
        binary = os.path.join(self.plugin_dir, plugin["type"])
        proc = subprocess.run(netns.nsenter_argv(self.node_netns, [binary]),
                              input=json.dumps(conf), capture_output=True, text=True, env=env,
                              timeout=60)
        if proc.returncode != 0:
            detail = proc.stdout.strip() or proc.stderr.strip()
            raise CniError(f"CNI {command} {plugin['type']} for {container_id} failed "
                           f"(exit {proc.returncode}): {detail}")
        if command != "ADD":
            return None
        return json.loads(proc.stdout)

    def add(self, container_id: str, netns_path: str, ifname: str = "eth0") -> dict[str, Any]:
        """CNI ADD through the chain; returns the final result (``ips``, ``interfaces``...)."""
        result: dict[str, Any] | None = None
        for plugin in self.conflist()["plugins"]:
            result = self._invoke(plugin, "ADD", container_id, netns_path, ifname, result)
        assert result is not None
        return result

    def check(self, container_id: str, netns_path: str, prev_result: dict[str, Any],
              ifname: str = "eth0") -> None:
        """CNI CHECK through the chain: raises CniError when the pod's wiring is broken."""
        for plugin in self.conflist()["plugins"]:
            self._invoke(plugin, "CHECK", container_id, netns_path, ifname, prev_result)

    def delete(self, container_id: str, netns_path: str | None,
               prev_result: dict[str, Any] | None, ifname: str = "eth0") -> list[str]:
        """CNI DEL through the chain in reverse; best effort, returns the errors seen."""
        errors = []
        for plugin in reversed(self.conflist()["plugins"]):
            try:
                self._invoke(plugin, "DEL", container_id, netns_path or "", ifname, prev_result)
            except (CniError, subprocess.SubprocessError, OSError) as e:
                errors.append(str(e))
        return errors


def result_ips(result: dict[str, Any]) -> list[str]:
    """The pod's addresses (no prefix length) from an ADD result, IPv4 first."""
    ips = [entry["address"].split("/")[0] for entry in result.get("ips", [])]
    return sorted(ips, key=lambda ip: ":" in ip)
