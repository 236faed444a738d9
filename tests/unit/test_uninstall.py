"""`nodeproxy uninstall` without a kernel: the CNI part on temporary dirs, the leaving check."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodeproxy.cli import uninstall
from nodeproxy.cni import conflist, install, kubeapi

REPO = Path(__file__).resolve().parents[2]
PRIMARY = {"cniVersion": "1.0.0", "name": "k8s",
           "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]}


def args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    uninstall.add_arguments(parser)
    return parser.parse_args(["--bpffs", str(tmp_path / "bpffs"),
                              "--control-socket", str(tmp_path / "control.sock"), *extra])


def node_dir(tmp_path: Path) -> tuple[Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-k8s.conflist").write_text(json.dumps(PRIMARY))
    (conf / "20-other.conflist").write_text('{"plugins": [{"type": "ptp"}]}')
    conflist.insert(conf, install.plugin_entry())
    install.install_zipapp(bin_dir)
    return conf, bin_dir


def test_removes_the_chained_entry_and_our_binary_idempotently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    conf, bin_dir = node_dir(tmp_path)
    other_before = (conf / "20-other.conflist").read_text()
    pins = tmp_path / "bpffs" / "nodeproxy" / "node-a"
    (pins / "links").mkdir(parents=True)
    (pins / "links" / "connect4").write_text("")
    (pins / "maps").mkdir()
    (pins / "maps" / "pods").write_text("")
    a = args(tmp_path, "--node", "node-a", "--cni-conf-dir", str(conf),
             "--cni-bin-dir", str(bin_dir))
    assert uninstall.run(a) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed nodeproxy-cni from {conf / '10-k8s.conflist'}",
                   f"removed {bin_dir / 'nodeproxy-cni'}",
                   f"removed pinned link {pins / 'links' / 'connect4'}",
                   f"removed pinned map {pins / 'maps' / 'pods'}"]
    assert json.loads((conf / "10-k8s.conflist").read_text()) == PRIMARY
    assert (conf / "20-other.conflist").read_text() == other_before
    assert not (bin_dir / "nodeproxy-cni").exists()
    assert not (tmp_path / "bpffs" / "nodeproxy").exists()
    assert uninstall.run(a) == 0
    assert capsys.readouterr().out.strip() == "nothing to remove"


def test_a_binary_installed_otherwise_is_left(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nodeproxy-cni").write_text("#!/bin/sh\n")
    assert uninstall.run(args(tmp_path, "--all", "--cni-bin-dir", str(bin_dir))) == 0
    assert "not installed by nodeproxy's init container" in capsys.readouterr().out
    assert (bin_dir / "nodeproxy-cni").exists()


def test_all_removes_every_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for node in ("a", "b"):
        (tmp_path / "bpffs" / "nodeproxy" / node / "maps").mkdir(parents=True)
        (tmp_path / "bpffs" / "nodeproxy" / node / "maps" / "pods").write_text("")
    assert uninstall.run(args(tmp_path, "--all")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert not (tmp_path / "bpffs" / "nodeproxy").exists()


def test_node_or_all_is_required(tmp_path: Path):
    with pytest.raises(SystemExit):
        args(tmp_path)


def test_only_if_leaving_acts_only_when_the_namespace_is_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    conf, bin_dir = node_dir(tmp_path)
    a = args(tmp_path, "--node", "n", "--cni-conf-dir", str(conf), "--only-if-leaving",
             "--namespace", "nodeproxy-system")
    namespace = {"metadata": {"name": "nodeproxy-system"}, "status": {"phase": "Active"}}
    asked = []
    monkeypatch.setattr(kubeapi, "get_json", lambda path, **kw: asked.append(path) or namespace)
    assert uninstall.run(a) == 0
    assert "rolling update" in capsys.readouterr().out
    assert asked == ["/api/v1/namespaces/nodeproxy-system"]
    assert any(p.get("type") == "nodeproxy-cni"
               for p in json.loads((conf / "10-k8s.conflist").read_text())["plugins"])
    namespace["status"]["phase"] = "Terminating"
    assert uninstall.run(a) == 0
    out = capsys.readouterr().out
    assert "being deleted" in out and "removed nodeproxy-cni" in out
    assert json.loads((conf / "10-k8s.conflist").read_text()) == PRIMARY


def test_leaving_without_api_access_assumes_a_restart(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    is_leaving, why = uninstall.leaving("nodeproxy-system")
    assert not is_leaving and "KUBERNETES_SERVICE_HOST" in why


def test_nodeproxy_uninstall_is_a_subcommand():
    """Registered in nodeproxy/cli/main.py under the name the manifests' preStop uses."""
    out = subprocess.run([sys.executable, "-m", "nodeproxy", "uninstall", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--only-if-leaving" in out.stdout


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_in_cluster_get_sends_the_token_and_checks_the_cluster_ca(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """kubeapi.get_json against a loopback HTTPS server standing in for the API server."""
    import http.server
    import ssl
    import threading

    cert, key = _self_signed(tmp_path)
    (tmp_path / "token").write_text("sa-token\n")
    seen: list[tuple[str, str | None]] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"metadata": {"name": "nodeproxy-system",
                                            "deletionTimestamp": "2026-01-01T00:00:00Z"},
                               "status": {"phase": "Terminating"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
        get = lambda path: kubeapi.get_json(path, sa_dir=str(tmp_path))  # noqa: E731
        assert kubeapi.namespace_terminating("nodeproxy-system", get)
        assert seen == [("/api/v1/namespaces/nodeproxy-system", "Bearer sa-token")]
        # Another CA: the server is not trusted, and the check says so.
        other = tmp_path / "other"
        other.mkdir()
        _self_signed(other)
        (other / "token").write_text("t")
        with pytest.raises(kubeapi.ApiUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            kubeapi.get_json("/api/v1/namespaces/x", sa_dir=str(other))
    finally:
        server.shutdown()
        server.server_close()
