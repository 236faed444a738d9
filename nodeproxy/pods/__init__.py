"""Pods on this node: their network namespaces and their enrollment in the mesh."""
