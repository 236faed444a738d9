"""nodeproxy: an eBPF-accelerated, sidecarless service-mesh proxy for Kubernetes nodes."""

__version__ = "0.1.0"
