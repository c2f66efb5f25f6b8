"""`auralink certs`: a CA and node certificates for Ray's mutual TLS.

Ray encrypts and authenticates its gRPC traffic (GCS, raylets, workers, object transfer) when
every process starts with:

    RAY_USE_TLS=1
    RAY_TLS_SERVER_CERT=<node certificate, PEM>
    RAY_TLS_SERVER_KEY=<node private key, PEM>
    RAY_TLS_CA_CERT=<CA certificate, PEM>

The same certificate serves as server and client certificate (Ray requires and verifies
client certificates), so it carries both the serverAuth and clientAuth usages. Ray connects
by IP address, so the node certificate lists every node IP as an IP SAN (plus `localhost`).

Layout written under `--out`:

    ca.crt  ca.key       the cluster CA (keep ca.key off worker images if you can)
    node.crt node.key    the node certificate and key (key mode 0600)
    ray-tls.env          `export VAR=...` lines; `source` it before `ray start` / `serve`

With `--ca-dir` an existing CA signs a new node certificate: that is how an autoscaled node
whose IP is known only at boot gets its own certificate (see ray_cluster.yaml).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
ENV_FILE = "ray-tls.env"


@dataclass(frozen=True)
class TlsBundle:
    ca_cert: Path
    ca_key: Path | None  # None when the CA key was not written here
    node_cert: Path
    node_key: Path

    def env(self) -> dict[str, str]:
        """The environment Ray reads to turn on mutual TLS."""
        return {
            "RAY_USE_TLS": "1",
            "RAY_TLS_SERVER_CERT": str(self.node_cert),
            "RAY_TLS_SERVER_KEY": str(self.node_key),
            "RAY_TLS_CA_CERT": str(self.ca_cert),
        }


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: supported by gRPC/BoringSSL, small and fast to generate
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AuraLink AIC"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(common_name: str = "AuraLink Ray CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create_node_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ips: list[str],
    dns_names: list[str],
    common_name: str = "auralink-ray-node",
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate valid as TLS server and client for the given IPs and DNS names."""
    if not ips and not dns_names:
        raise ValueError("a node certificate needs at least one --ip or --dns name")
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(d) for d in dns_names]
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                          crl_sign=False, content_commitment=False, data_encipherment=False,
                          key_agreement=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, private: bool) -> None:
    # Create private files with 0600 from the start: never world-readable, even briefly.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY} is not an EC private key")
    return key, cert


def write_bundle(
    out: Path,
    ips: list[str],
    dns_names: list[str] | None = None,
    ca_dir: Path | None = None,
    days: int = 365,
) -> TlsBundle:
    """Create (or reuse, with `ca_dir`) a CA, sign a node certificate, write files + env."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dns = list(dns_names) if dns_names is not None else ["localhost"]
    if ca_dir is not None:
        ca_key, ca_cert = load_ca(Path(ca_dir))
        ca_key_path = None
        if Path(ca_dir).resolve() != out:
            _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        else:
            ca_key_path = out / CA_KEY
    else:
        ca_key, ca_cert = create_ca()
        _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out / CA_KEY, _key_pem(ca_key), private=True)
        ca_key_path = out / CA_KEY
    node_key, node_cert = create_node_cert(ca_key, ca_cert, ips, dns, days=days)
    _write(out / NODE_CERT, node_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / NODE_KEY, _key_pem(node_key), private=True)
    bundle = TlsBundle(out / CA_CERT, ca_key_path, out / NODE_CERT, out / NODE_KEY)
    env_text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in bundle.env().items())
    _write(out / ENV_FILE, env_text.encode(), private=False)
    return bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory for the PEM files")
    parser.add_argument("--ip", action="append", default=[], metavar="ADDR",
                        help="node IP for the certificate's IP SANs (repeat; Ray connects by IP)")
    parser.add_argument("--dns", action="append", default=None, metavar="NAME",
                        help="DNS SAN (repeat; default: localhost)")
    parser.add_argument("--ca-dir", type=Path, default=None,
                        help="sign with the CA in this directory instead of creating one")
    parser.add_argument("--days", type=int, default=365, help="node certificate validity")


def run(args: argparse.Namespace) -> int:
    try:
        for ip in args.ip:
            ipaddress.ip_address(ip)
    except ValueError as exc:
        print(f"auralink certs: {exc}", file=sys.stderr)
        return 2
    bundle = write_bundle(args.out, args.ip, args.dns, args.ca_dir, args.days)
    print(f"# wrote {bundle.node_cert} (SANs: IP {', '.join(args.ip) or '-'}; "
          f"DNS {', '.join(args.dns or ['localhost'])}) signed by {bundle.ca_cert}")
    print(f"# source {bundle.node_cert.parent / ENV_FILE} before `ray start` on this node:")
    for k, v in bundle.env().items():
        print(f"export {k}={shlex.quote(v)}")
    return 0
