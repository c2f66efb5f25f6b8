"""`auralink certs`: CA + node certificate with IP SANs, key permissions, Ray TLS environment."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cluster import certs
from cluster.cli import main


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_cli_writes_ca_node_cert_and_env(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tls"
    rc = main(["certs", "--out", str(out), "--ip", "127.0.0.1", "--ip", "10.0.3.7", "--ip", "::1"])
    assert rc == 0
    printed = capsys.readouterr().out
    for var in ("RAY_USE_TLS=1", f"RAY_TLS_SERVER_CERT={out / 'node.crt'}",
                f"RAY_TLS_SERVER_KEY={out / 'node.key'}", f"RAY_TLS_CA_CERT={out / 'ca.crt'}"):
        assert f"export {var}" in printed
        assert f"export {var}" in (out / "ray-tls.env").read_text()

    ca, node = _load(out / "ca.crt"), _load(out / "node.crt")
    node.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.3.7"), ipaddress.ip_address("::1")
    }
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # Ray uses one certificate as server and as client (mutual TLS)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    for key in ("node.key", "ca.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600


def test_existing_ca_signs_a_new_node(tmp_path: Path) -> None:
    first = certs.write_bundle(tmp_path / "head", ["10.0.0.1"])
    second = certs.write_bundle(tmp_path / "worker", ["10.0.0.2"], ["worker-1"], ca_dir=tmp_path / "head")
    assert second.ca_key is None and not (tmp_path / "worker" / "ca.key").exists()
    ca = _load(first.ca_cert)
    assert _load(second.ca_cert) == ca
    worker = _load(second.node_cert)
    worker.verify_directly_issued_by(ca)
    san = worker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["worker-1"]
    assert _load(first.node_cert).serial_number != worker.serial_number


def test_bad_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["certs", "--out", str(tmp_path / "x"), "--ip", "10.0.0.300"]) == 2
    assert "does not appear to be an IPv4 or IPv6 address" in capsys.readouterr().err
    ca_key, ca_cert = certs.create_ca()
    with pytest.raises(ValueError, match="needs at least one --ip or --dns name"):
        certs.create_node_cert(ca_key, ca_cert, [], [])
