#!/usr/bin/env python3
"""Make what a secure FedSpaLLM federation needs: TLS certificates and SuperNode keys.

    python docker/make_certs.py                      # into docker/certs, 3 SuperNodes
    python docker/make_certs.py --host link.example.org --host 203.0.113.7 --supernodes 5

Writes, under ``--out`` (default ``docker/certs``):

    ca.crt, ca.key            a private certificate authority (keep ca.key offline)
    server.crt, server.key    the SuperLink's TLS certificate, signed by the CA, with SANs
                              localhost, superlink, 127.0.0.1, ::1 and every --host
    supernode-N.key           SuperNode N's authentication key: ECDSA P-384, OpenSSH format
    supernode-N.pub           its public key, to register with ``flwr supernode register``
    superexec.secret          shared secret between the SuperLink and its SuperExec
                              (``--superexec-auth-secret-file``, process isolation)

The SuperLink gets ca.crt, server.crt, server.key and superexec.secret; each SuperNode
gets ca.crt (``--root-certificates``) and its own supernode-N.key; the ``flwr`` CLI gets
ca.crt (``root-certificates`` of its SuperLink connection). Existing files are kept unless
``--force``: re-running adds missing pieces (e.g. more SuperNode keys) without invalidating
certificates already handed out; the server certificate is re-issued when a --host is
not among its SANs yet.

Needs only the ``cryptography`` package (a dependency of ``flwr``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "superlink", "127.0.0.1", "::1")
CURVE = ec.SECP384R1  # P-384: a NIST curve, as Flower's SuperNode authentication requires


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedSpaLLM federation CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key


def make_server_cert(
    out: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int,
) -> None:
    key = _private_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    """Whether the certificate at ``cert_path`` already names every host in its SANs."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return all(_san(host) in names for host in hosts)


def make_supernode_key(out: Path, name: str) -> None:
    """An ECDSA key pair in OpenSSH format, as ``flower-supernode`` and ``flwr`` read them."""
    key = _private_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(out / f"{name}.key", private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "certs",
        help="output directory (default: docker/certs)",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the SuperNodes and the flwr CLI use to reach the "
        "SuperLink; repeat for several (localhost, superlink, 127.0.0.1 and ::1 are always "
        "included)",
    )
    parser.add_argument(
        "--supernodes", type=int, default=3, help="number of SuperNode keys (default 3)"
    )
    parser.add_argument("--days", type=int, default=365, help="validity (default 365 days)")
    parser.add_argument(
        "--force", action="store_true", help="replace existing files instead of keeping them"
    )
    args = parser.parse_args(argv)
    if args.supernodes < 0:
        parser.error("--supernodes must be at least 0")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys([*args.host, *DEFAULT_HOSTS]))

    def missing(*names: str) -> bool:
        return args.force or not all((out / name).exists() for name in names)

    made = []
    if missing("ca.crt", "ca.key"):
        ca_cert, ca_key = make_ca(out, args.days)
        made.append("ca.crt")
        fresh_ca = True
    else:
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        fresh_ca = False
    if fresh_ca or missing("server.crt", "server.key") or not _covers(out / "server.crt", hosts):
        make_server_cert(out, ca_cert, ca_key, hosts, args.days)
        made.append(f"server.crt (SANs: {', '.join(hosts)})")
    for index in range(1, args.supernodes + 1):
        name = f"supernode-{index}"
        if missing(f"{name}.key", f"{name}.pub"):
            make_supernode_key(out, name)
            made.append(f"{name}.key/.pub")
    if missing("superexec.secret"):
        _write(out / "superexec.secret", secrets.token_hex(32).encode(), private=True)
        made.append("superexec.secret")
    print(f"{out}: " + ("made " + "; ".join(made) if made else "everything already there"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
