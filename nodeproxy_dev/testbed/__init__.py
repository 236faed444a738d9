"""A simulated cluster on one machine: nodes and pods as network namespaces wired by the real CNI plugins, for the demo, tests and benchmarks.

Modules:

- ``netns``: named network namespaces, commands and sockets inside them, HTTP over
  a netns socket or a Unix socket.
- ``cni``: the real CNI plugins (bridge + host-local + loopback), invoked as a
  container runtime does.
- ``cgroups``: pod cgroups under a node's cgroup v2 subtree.
- ``cluster``: ``Cluster``, nodes + pods + services + one daemon per node.
- ``peer``: the traffic tool run inside pods (``python -m nodeproxy_dev.testbed.peer``).
- ``http_backend``: the HTTP/1.1 backend of the L7 tests (status, delay, failures,
  resets, bodies, stats, WebSocket, a request log), chosen per request by its path.
- ``grpc_backend`` and ``grpc_client``: service ``test.Echo`` on raw bytes (unary,
  streaming, failures with a status) and a client that reports calls as JSON.
- ``nginx``: nginx configurations for pods, among them an HTTP/2 cleartext backend.
- ``attack``: a hostile pod's client (HTTP/2 rapid reset, connection flood, slowloris),
  bounded, reporting what the proxy did about it.
"""  # noqa: E501
