"""Make, check and serve the mesh CA (`ca init`, `ca check`, `ca serve`).

`nodeproxy ca init --trust-domain D --out DIR [--days N] [--intermediate-days N] [--force]`
writes a new ECDSA P-256 root and an intermediate it signs: DIR/root-cert.pem (0644),
DIR/root-key.pem (0600: keep it offline, it is needed only to make the next
intermediate), DIR/ca-cert.pem (the intermediate followed by the root, 0644) and
DIR/ca-key.pem (0600: the signing service's key). Existing files are never overwritten
without --force. `--root-cert F --root-key F` makes only a new intermediate under an
existing root (rotation, docs/security.md).

`nodeproxy ca check --cert F --key F --trust-domain D` loads a CA as the daemon would.

`nodeproxy ca serve --cert ca-cert.pem --key ca-key.pem --trust-domain D ...` runs the
signing service (nodeproxy/signer/signing_service.py): it refuses a root (a self-signed CA) as its
key, since the root stays offline.

Exit status: 0 done, 1 refused or invalid, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nodeproxy.identity.mesh_ca import (
    DEFAULT_INTERMEDIATE_DAYS,
    DEFAULT_ROOT_DAYS,
    CAError,
    MeshCA,
    create_intermediate,
)
from nodeproxy.identity.spiffe import IdentityError, validate_trust_domain
from nodeproxy.signer.signing_service import DEFAULT_AUDIENCE, DEFAULT_MAX_TTL, DEFAULT_PORT

DEFAULT_DNS_NAME = "nodeproxy-ca.nodeproxy-system.svc"
DEFAULT_NODE_AGENT = "system:serviceaccount:nodeproxy-system:nodeproxy"

CERT_FILE = "root-cert.pem"
KEY_FILE = "root-key.pem"
INTERMEDIATE_CERT_FILE = "ca-cert.pem"
INTERMEDIATE_KEY_FILE = "ca-key.pem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create a new mesh root CA",
                              description="Create a self-signed ECDSA P-256 mesh root CA.")
    init.add_argument("--trust-domain", required=True,
                      help="SPIFFE trust domain, e.g. cluster.local")
    init.add_argument("--out", required=True, type=Path, help="directory for the two PEM files")
    init.add_argument("--days", type=int, default=DEFAULT_ROOT_DAYS,
                      help=f"validity of the root in days (default {DEFAULT_ROOT_DAYS})")
    init.add_argument("--intermediate-days", type=int, default=DEFAULT_INTERMEDIATE_DAYS,
                      help="validity of the intermediate in days (default "
                           f"{DEFAULT_INTERMEDIATE_DAYS}; never past the root)")
    init.add_argument("--root-cert", type=Path,
                      help="with --root-key: make only a new intermediate under this root")
    init.add_argument("--root-key", type=Path)
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(_ca_run=_run_init)

    serve = actions.add_parser("serve", help="run the mesh signing service",
                               description="Sign workload CSRs from node daemons, each only "
                                           "for the identities of pods on its node.")
    serve.add_argument("--cert", required=True, type=Path,
                       help="intermediate CA certificate PEM followed by the root (ca-cert.pem)")
    serve.add_argument("--key", required=True, type=Path, help="intermediate key (ca-key.pem)")
    serve.add_argument("--trust-domain", required=True)
    serve.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}",
                       help=f"address:port (default 0.0.0.0:{DEFAULT_PORT})")
    serve.add_argument("--dns-name", action="append", default=None,
                       help="DNS name in the service's certificate (repeatable; default "
                            f"{DEFAULT_DNS_NAME})")
    serve.add_argument("--audience", default=DEFAULT_AUDIENCE,
                       help=f"audience node tokens must be bound to (default {DEFAULT_AUDIENCE})")
    serve.add_argument("--node-agent", default=DEFAULT_NODE_AGENT,
                       help="the node daemon's service account, as its token's username "
                            f"(default {DEFAULT_NODE_AGENT})")
    serve.add_argument("--max-ttl-seconds", type=float, default=DEFAULT_MAX_TTL,
                       help=f"longest leaf signed (default {DEFAULT_MAX_TTL})")
    serve.add_argument("--kube-api", help="Kubernetes API base URL (default: in-cluster)")
    serve.add_argument("--kube-token-file", help="bearer token for --kube-api")
    serve.add_argument("--kube-ca-file", help="CA bundle for --kube-api")
    serve.set_defaults(_ca_run=_run_serve)

    check = actions.add_parser("check", help="load a CA certificate and key as the daemon would")
    check.add_argument("--cert", required=True, type=Path, help="CA certificate PEM (+ chain)")
    check.add_argument("--key", required=True, type=Path, help="CA private key PEM")
    check.add_argument("--trust-domain", required=True)
    check.set_defaults(_ca_run=_run_check)


def run(args: argparse.Namespace) -> int:
    return int(args._ca_run(args))


def _run_init(args: argparse.Namespace) -> int:
    try:
        validate_trust_domain(args.trust_domain)
    except IdentityError as e:
        print(f"nodeproxy ca init: --trust-domain: {e}", file=sys.stderr)
        return 2
    if args.days < 1:
        print("nodeproxy ca init: --days must be at least 1", file=sys.stderr)
        return 2
    if args.intermediate_days < 1:
        print("nodeproxy ca init: --intermediate-days must be at least 1", file=sys.stderr)
        return 2
    if (args.root_cert is None) != (args.root_key is None):
        print("nodeproxy ca init: give both --root-cert and --root-key, or neither",
              file=sys.stderr)
        return 2
    out: Path = args.out
    cert_path, key_path = out / CERT_FILE, out / KEY_FILE
    ica_path, ikey_path = out / INTERMEDIATE_CERT_FILE, out / INTERMEDIATE_KEY_FILE
    new_root = args.root_cert is None
    targets = (cert_path, key_path, ica_path, ikey_path) if new_root else (ica_path, ikey_path)
    if not args.force:
        existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
        if existing:
            print(f"nodeproxy ca init: refusing to overwrite {', '.join(existing)} "
                  "(use --force to replace the CA; every workload certificate changes)",
                  file=sys.stderr)
            return 1
    try:
        if new_root:
            root = MeshCA.generate(args.trust_domain, days=args.days)
        else:
            root = MeshCA.load(args.root_cert, args.root_key, args.trust_domain)
            if root.certificate != root.root:
                print(f"nodeproxy ca init: {args.root_cert} is not a root (self-signed) CA",
                      file=sys.stderr)
                return 1
        cert, key = create_intermediate(args.trust_domain, root.certificate, root.signing_key,
                                        days=args.intermediate_days)
        intermediate = MeshCA(cert, key, args.trust_domain, issuers=[root.certificate])
        out.mkdir(parents=True, exist_ok=True)
        # Keys first: a cert without its key is useless, a key without a cert is harmless.
        if new_root:
            _write(key_path, root.private_key_pem(), 0o600)
            _write(cert_path, root.certificate_pem(), 0o644)
        _write(ikey_path, intermediate.private_key_pem(), 0o600)
        _write(ica_path, intermediate.certificate_pem(), 0o644)
    except CAError as e:
        print(f"nodeproxy ca init: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nodeproxy ca init: {e}", file=sys.stderr)
        return 1
    if new_root:
        print(f"root certificate: {cert_path}")
        print(f"root key:         {key_path}  (keep offline: not needed by any running "
              "component)")
    print(f"intermediate:     {ica_path}  (with the root appended)")
    print(f"intermediate key: {ikey_path}  (for `nodeproxy ca serve` only)")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from nodeproxy.signer.kube import KubeApi, KubeError
    from nodeproxy.signer.signing_service import SigningService, serve

    try:
        ca = MeshCA.load(args.cert, args.key, args.trust_domain)
    except CAError as e:
        print(f"nodeproxy ca serve: {e}", file=sys.stderr)
        return 1
    except IdentityError as e:
        print(f"nodeproxy ca serve: --trust-domain: {e}", file=sys.stderr)
        return 2
    if ca.certificate == ca.root:
        print(f"nodeproxy ca serve: {args.cert} is the root CA: the root key stays offline; "
              "give the intermediate (ca-cert.pem, ca-key.pem from `nodeproxy ca init`)",
              file=sys.stderr)
        return 1
    host, _, port_text = args.listen.rpartition(":")
    if not host or not port_text.isdigit():
        print(f"nodeproxy ca serve: --listen {args.listen!r}: want address:port",
              file=sys.stderr)
        return 2
    try:
        kube = (KubeApi(args.kube_api, token_file=args.kube_token_file,
                        ca_file=args.kube_ca_file) if args.kube_api else KubeApi.in_cluster())
    except KubeError as e:
        print(f"nodeproxy ca serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    service = SigningService(ca, kube, audience=args.audience, node_agent=args.node_agent,
                             max_ttl_seconds=args.max_ttl_seconds)

    async def main() -> None:
        runner = await serve(service, host.strip("[]"), int(port_text),
                             args.dns_name or [DEFAULT_DNS_NAME])
        print(f"nodeproxy ca serve: listening on {args.listen}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await kube.close()

    asyncio.run(main())
    return 0


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with exactly `mode`, whatever the umask."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _run_check(args: argparse.Namespace) -> int:
    try:
        ca = MeshCA.load(args.cert, args.key, args.trust_domain)
    except CAError as e:
        print(f"nodeproxy ca check: {e}", file=sys.stderr)
        return 1
    except IdentityError as e:
        print(f"nodeproxy ca check: --trust-domain: {e}", file=sys.stderr)
        return 2
    cert = ca.certificate
    print(f"{args.cert}: valid CA for trust domain {ca.trust_domain!r}")
    print(f"  subject:   {cert.subject.rfc4514_string()}")
    print(f"  root:      {ca.root.subject.rfc4514_string()}")
    print(f"  not after: {cert.not_valid_after_utc.isoformat()}")
    return 0
