"""HTTPS for edge installs: a self-signed certificate naming this host, and the server's SSL context."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import ApplianceError

IPName = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_names() -> list[str]:
    """This host's names and addresses: what a client on the LAN may type to reach it."""
    names = ["localhost", socket.gethostname(), socket.getfqdn()]
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                names.append(a.address.split("%")[0])  # drop an IPv6 zone id
    names += ["127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_self_signed(cert_path: Path, key_path: Path, names: list[str], *, days: int, now: datetime.datetime | None = None) -> None:
    """An ECDSA P-256 key (0600) and a certificate valid for `names` (DNS names and IPs as SANs)."""
    if not names:
        raise ApplianceError("a certificate needs at least one host name or address", code="usage")
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        # a CA for itself, so clients can trust exactly this certificate with --cacert / verify=
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ApplianceError(f"cannot load the TLS certificate {cert} and key {key}: {exc}", code="invalid_tls") from None
    return ctx


def client_context(cert: Path | None) -> ssl.SSLContext:
    """The system's trust store, plus the appliance's own certificate (self-signed installs)."""
    ctx = ssl.create_default_context()
    if cert is not None and cert.exists():
        ctx.load_verify_locations(cert)
    return ctx
