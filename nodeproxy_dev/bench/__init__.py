"""Benchmarks: nodeproxy against a direct connection and HAProxy, side by side, in one run.

Modules:

- ``settings``: how long and how often (``--quick`` and full).
- ``model``: paths, server kinds, routes, metrics and the measured cells.
- ``configurations``: the configurations compared (direct, nodeproxy at L4 and L7,
  haproxy in tcp and http mode) and the planned ones this build cannot run yet (the
  pluggable hook).
- ``topology``: the one two-node cluster every configuration runs on, its servers
  and the HAProxy pod (``haproxy`` writes HAProxy's configuration).
- ``procstat``: CPU seconds and resident memory of processes, and the machine.
- ``runner``: one bounded tool run inside a pod.
- ``sockperf``, ``iperf``, ``wrk``, ``h2load``, ``grpcload``, ``connections``,
  ``enrollment``: one runner per tool or measurement; ``grpcunary`` is the gRPC unary
  server and client the pods run; ``idle`` is the in-pod client that holds idle connections.
- ``noisy``: the noisy neighbour, a quiet pod's HTTP alone and while another pod attacks
  the same proxy (with ``nodeproxy_dev.testbed.attack``); ``cpulimit`` caps the attacker's
  CPU as a pod limit would.
- ``scenarios``: what is measured, as named scenarios producing metrics.
- ``stats``: median, spread and ratio to ``direct``.
- ``report``: the JSON document and the markdown table.
- ``suite``: alternates the configurations over the rounds and collects it all.
- ``importprofile``: where the daemon's start-up memory goes, import by import (RSS and
  Python allocations); run on its own, not part of the suite.
- ``tls_layer``: the TLS layer under HBONE alone (one mutual-TLS connection, bulk bytes,
  TLS transports compared); run on its own, not part of the suite.
"""
