"""The mesh: what the node knows (one snapshot, one holder) and what it decides about one
connection, after capture and before any listener.

destinations.py  where a captured connection goes: a service VIP's endpoint, a known pod,
                 or the outbound policy (an immutable table, rebuilt whole)
round_robin.py   the L4 endpoint choice per service port
enrolled_pod.py  an enrolled pod: its workload, identity, network namespace and kernel id
upstream.py      by which path a backend is reached: transparent into a local pod, an
                 HBONE stream to another node, or plain
snapshot.py      the mesh state as one immutable snapshot: a pure function of the node
                 config, discovered workloads and services, pods enrolled here and pods
                 registered on other nodes -> destination table, admitter, kernel denies
holder.py        MeshState, the one reference to the snapshot in force, which every
                 component reads (as ztunnel's src/state: stores that are data, one handle)
"""
