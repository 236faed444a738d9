"""Kernel side: loading, attaching and reading the eBPF programs and maps."""
