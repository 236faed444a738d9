"""Kernel side: everything nodeproxy asks of the kernel to steer a pod's traffic.

Network namespaces and their sysctls (``namespaces``, ``sysctl``), the numbers the eBPF
programs and the daemon agree on (``constants``), what bcc builds (``bpf_build``, run only
in the short-lived ``load_child`` and in ``preflight``: the daemon never imports bcc), the
programs and their maps (``programs``, ``map_access``, ``maps``, ``splice``,
``msg_redirect``, ``libbpf``, ``kernelfs``; socket options on a bare descriptor:
``sockopt``), the
iptables rules of the fallback mode (``iptables``), transparent connections into a pod
and the routing that brings the application's replies back (``transparent``, its rules
and routes made with ``rtnetlink``), where a
captured connection was going (``original_dst``), and the node checks (``preflight``).
"""
