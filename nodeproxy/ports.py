"""The node proxy's default ports: the one definition.

Istio's numbers, so tooling and habits carry over.  The config model
(`proxy.*Port`, `admin.*Port`) defaults to them, and everything else that needs a
port before or without a config (the capture programs' -D flags, the iptables
chains, `nodeproxy check`, the CLI's admin address, the testbed) takes them from
here; only tests that check a documented default spell the numbers out.
This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

# Inside each enrolled pod's network namespace.
OUTBOUND_PORT = 15001  # captured outbound connections (loopback listener)
INBOUND_PORT = 15006  # plaintext into the pod from outside the mesh
HBONE_PORT = 15008  # HBONE (HTTP/2 CONNECT over mTLS) from other nodes' proxies

# In the daemon's own network namespace.
ADMIN_PORT = 15000  # admin API (127.0.0.1 by default)
METRICS_PORT = 15020  # Prometheus /metrics
READINESS_PORT = 15021  # /healthz/ready
