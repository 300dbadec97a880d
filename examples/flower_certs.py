"""Certificates and SuperNode keys for a TLS deployment of the fedlora Flower app (docs/flower.md).

Each party makes its own secrets; only public material changes hands:

    python examples/flower_certs.py coordinator certs/ --hosts superlink.example.org
        # the coordinator: ca.crt, ca.key (a certificate authority; keep ca.key offline) and
        # server.pem, server.key (the SuperLink's certificate for --hosts). Hand ca.crt to every organisation.
    python examples/flower_certs.py node keys/ --name hospital
        # each organisation, on its own machine: keys/hospital (its private key, never leaves) and
        # keys/hospital.pub (printed too), the public key the coordinator registers
        # (`flwr supernode register hospital.pub` and the registry's public_key).

    python examples/flower_certs.py certs/ --nodes 2     # a trial on one machine: all of the above in one folder

Key pairs are P-384; node keys in OpenSSH format, for ``flower-supernode
--auth-supernode-private-key``. A production deployment may take its certificates from its
own CA. Private keys are written readable by their owner only; an existing file is never
overwritten. Needs ``cryptography`` (a dependency of flwr).
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
    # "x": never replace a key or certificate someone already relies on; a private key is
    # created 0600 rather than made so after being written
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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


def coordinator(out: Path, hosts: str) -> None:
    ca, ca_key = make_ca(out)
    make_server_cert(out, ca, ca_key, [h.strip() for h in hosts.split(",") if h.strip()])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", nargs="?", choices=["coordinator", "node"], help="omitted: a one-machine trial")
    p.add_argument("out", type=Path)
    p.add_argument("--hosts", default="127.0.0.1,localhost", help="the SuperLink's addresses, comma-separated")
    p.add_argument("--name", default="node", help="node: the key pair's file name")
    p.add_argument("--nodes", type=int, default=2, help="trial: how many SuperNode key pairs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.role == "node":
            public = make_node_key(args.out, args.name)
            print(f"private key: {args.out / args.name} (keep it here)\npublic key, for the coordinator: "
                  f"{args.out / args.name}.pub\n{public.decode()}")
            return
        coordinator(args.out, args.hosts)
        if args.role is None:
            for i in range(args.nodes):
                make_node_key(args.out, f"node{i}")
    except FileExistsError as e:
        raise SystemExit(f"{e.filename} exists: not overwritten (choose another folder or --name)") from None
    print(f"wrote a CA and the SuperLink's certificate to {args.out}"
          + (f", and {args.nodes} node key pairs" if args.role is None else ": hand ca.crt to each organisation"))


if __name__ == "__main__":
    main()
