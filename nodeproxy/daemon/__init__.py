"""The node daemon: wires capture, pods, proxies, telemetry and admin together for one
node, and runs them.  One module per job:

- lifecycle.py: `Daemon` — start, serve, stop, and the one step that puts a new mesh
  snapshot in force whenever what the node knows changes.
- wiring.py: the parts, built from the config in dependency order (kernel side, proxies,
  scrape-time collectors).
- reload.py: validate the node file again, apply it whole or keep the version in force.
- handover.py: the upgrade handover, both the new instance's and the old one's side.
- runtime_pods.py: pods enrolled, registered or skipped at run time (typed results).
- saved_pods.py: those pods survive a restart (the state file).
- control_api.py: the control socket's HTTP API, typed errors to HTTP statuses.
- views.py: what /config_dump and /pods show.

The mesh state the parts read is nodeproxy.mesh's.
"""

from nodeproxy.daemon.lifecycle import Daemon

__all__ = ["Daemon"]
