"""The daemon's HTTP faces: admin (localhost), metrics, readiness, and the control socket
(server.py), and the control socket's client (control_client.py: standard library only,
so the CNI plugin can carry it)."""
