"""The daemon's HTTP faces: admin (localhost), metrics, readiness, and the control socket."""
