"""Make or check the mesh root CA (`ca init`, `ca check`).

`nodeproxy ca init --trust-domain D --out DIR [--days N] [--force]` writes a new ECDSA P-256
root: DIR/root-cert.pem (0644) and DIR/root-key.pem (0600). Existing files are never
overwritten without --force. Store the pair as a Kubernetes Secret for the DaemonSet.

`nodeproxy ca check --cert F --key F --trust-domain D` loads a CA as the daemon would.

Exit status: 0 done, 1 refused or invalid, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nodeproxy.identity.mesh_ca import DEFAULT_ROOT_DAYS, CAError, MeshCA
from nodeproxy.identity.spiffe import IdentityError, validate_trust_domain

CERT_FILE = "root-cert.pem"
KEY_FILE = "root-key.pem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create a new mesh root CA",
                              description="Create a self-signed ECDSA P-256 mesh root CA.")
    init.add_argument("--trust-domain", required=True,
                      help="SPIFFE trust domain, e.g. cluster.local")
    init.add_argument("--out", required=True, type=Path, help="directory for the two PEM files")
    init.add_argument("--days", type=int, default=DEFAULT_ROOT_DAYS,
                      help=f"validity of the root in days (default {DEFAULT_ROOT_DAYS})")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(_ca_run=_run_init)

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
    out: Path = args.out
    cert_path, key_path = out / CERT_FILE, out / KEY_FILE
    if not args.force:
        existing = [str(p) for p in (cert_path, key_path) if p.exists() or p.is_symlink()]
        if existing:
            print(f"nodeproxy ca init: refusing to overwrite {', '.join(existing)} "
                  "(use --force to replace the CA; every workload certificate changes)",
                  file=sys.stderr)
            return 1
    try:
        out.mkdir(parents=True, exist_ok=True)
        ca = MeshCA.generate(args.trust_domain, days=args.days)
        # Key first: a cert without its key is useless, a key without a cert is harmless.
        _write(key_path, ca.private_key_pem(), 0o600)
        _write(cert_path, ca.certificate_pem(), 0o644)
    except OSError as e:
        print(f"nodeproxy ca init: {e}", file=sys.stderr)
        return 1
    print(f"root certificate: {cert_path}")
    print(f"root key:         {key_path}")
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
