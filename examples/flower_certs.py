"""Certificates and SuperNode keys for a TLS deployment of the fedlora Flower app (docs/flower.md).

    python examples/flower_certs.py certs/ --hosts 127.0.0.1,localhost --nodes 2

writes into ``certs/``:

- ``ca.crt``, ``ca.key``: a certificate authority (keep ``ca.key`` off the SuperLink's machine);
- ``server.pem``, ``server.key``: the SuperLink's certificate for ``--hosts``, signed by the CA;
- ``node<i>``, ``node<i>.pub``: each SuperNode's key pair (P-384, OpenSSH format), for
  ``flower-supernode --auth-supernode-private-key node<i>`` and ``flwr supernode register node<i>.pub``.

For a test or a trial. A production deployment takes its certificates from its own CA.
Private keys are written readable by their owner only. Needs ``cryptography`` (a dependency of flwr).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=30)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA384()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_node_key(out: Path, name: str) -> bytes:
    """A SuperNode's key pair in OpenSSH format; returns the public key line."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / f"{name}.pub", public + b"\n")
    return public


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hosts", default="127.0.0.1,localhost", help="the SuperLink's addresses, comma-separated")
    p.add_argument("--nodes", type=int, default=2, help="how many SuperNode key pairs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(args.out)
    make_server_cert(args.out, ca, ca_key, [h.strip() for h in args.hosts.split(",") if h.strip()])
    for i in range(args.nodes):
        make_node_key(args.out, f"node{i}")
    print(f"wrote a CA, a server certificate and {args.nodes} node key pairs to {args.out}")


if __name__ == "__main__":
    main()
