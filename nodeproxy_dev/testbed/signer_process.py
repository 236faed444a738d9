"""How the suite starts the mesh's signing service (`nodeproxy ca serve`): one argv for
every test that runs it, and the wait for it to listen."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# The node daemons' ServiceAccount, as config/k8s/ names it.
NODE_AGENT = "system:serviceaccount:nodeproxy-system:nodeproxy"


def signer_argv(python: str, ca_dir: str | os.PathLike[str], *, trust_domain: str,
                listen: str, kube_api: str, dns_name: str, audience: str,
                max_ttl_seconds: int | None = None, cert: str = "ca-cert.pem",
                key: str = "ca-key.pem") -> list[str]:
    """`nodeproxy ca serve` with the intermediate in ca_dir (as `nodeproxy ca init`
    writes it), answering node daemons of NODE_AGENT."""
    argv = [python, "-m", "nodeproxy", "ca", "serve",
            "--cert", os.path.join(ca_dir, cert), "--key", os.path.join(ca_dir, key),
            "--trust-domain", trust_domain, "--listen", listen, "--dns-name", dns_name,
            "--kube-api", kube_api, "--audience", audience, "--node-agent", NODE_AGENT]
    if max_ttl_seconds is not None:
        argv += ["--max-ttl-seconds", str(max_ttl_seconds)]
    return argv


def wait_listening(proc: subprocess.Popen[bytes], log: str | os.PathLike[str],
                   offset: int = 0, timeout: float = 30.0) -> None:
    """Until the signer's log (from `offset` on) says it listens; RuntimeError with the
    log's end if it exits or takes longer than `timeout`."""
    path = Path(log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if proc.poll() is not None:
            raise RuntimeError(f"signer exited: {text[-2000:]}")
        if "listening on" in text[offset:]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"signer did not start within {timeout} s")
