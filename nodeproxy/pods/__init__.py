"""Pods on this node: enrolling them in the mesh (their listeners, then their steering)."""
