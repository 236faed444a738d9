"""The mesh state: what the node knows, as one immutable snapshot, and the holder every
component reads it from (as ztunnel's src/state: stores that are data, one shared handle).

- snapshot.py: the pure function (node config, discovered workloads and services, pods
  enrolled here, pods registered on other nodes) -> MeshSnapshot (destination table,
  admitter, connect()-time kernel denies).
- holder.py: MeshState, the one reference to the snapshot in force; replacing it is one
  assignment, then its watchers (caches derived from it, the kernel's deny map) follow.
"""
