"""Metrics: Istio-compatible proxy series and the kernel's own per-pod counters."""
