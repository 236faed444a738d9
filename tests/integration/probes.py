"""What a test asks from inside a pod: can it connect, and what did it get back."""

from __future__ import annotations

import textwrap

from nodeproxy.testbed.cluster import Cluster


def connect(cluster: Cluster, pod: str, host: str, port: int) -> str:
    """Connect from the pod and ask the peer who we are: 'connected <whoami JSON>',
    or the errno name of the failure ('EHOSTUNREACH', 'ECONNREFUSED', ...), within 5 s."""
    script = textwrap.dedent(f"""
        import errno, socket
        s = socket.socket(socket.AF_INET6 if ":" in {host!r} else socket.AF_INET)
        s.settimeout(5)
        try:
            s.connect(({host!r}, {port}))
            s.sendall(b"W")
            print("connected", s.recv(200).decode().strip())
        except OSError as e:
            print(errno.errorcode.get(e.errno, str(e)))
    """)
    out = cluster.run_in_pod(pod, [cluster.python, "-c", script], timeout=15)
    return out.stdout.strip() or out.stderr.strip()
