"""nodeproxy-cni: the chained CNI plugin that enrolls pods in the node daemon.

A container runtime runs it after the primary CNI plugin (bridge, flannel,
calico ...): on ADD it asks the daemon over its control socket to enroll the pod
(netns, cgroup, IPs, identity) and returns only once capture is in place; on DEL
it unenrolls the pod; CHECK asks whether the pod is enrolled.

Everything in this package uses the Python standard library only (plus
``nodeproxy.admin.control_client``, itself stdlib-only), so ``nodeproxy.cni.install``
can pack it into one self-contained zipapp that a node's own ``python3`` runs from
the CNI bin directory, outside the nodeproxy container image.
"""
