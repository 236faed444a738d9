"""nodeproxy: an eBPF-accelerated, sidecarless service-mesh proxy for Kubernetes nodes."""

from nodeproxy import native

__version__ = "0.1.0"

# The L7 path's compiled form is used only when it was built from these very sources
# (nodeproxy/native.py); decided here, before any of its modules is imported.
native.install()
