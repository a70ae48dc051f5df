"""The federation's own X.509 PKI: a CA, the orchestrator's TLS certificate, optional client certificates.

TLS certificates use ECDSA P-256 (every TLS stack speaks it); signing identities stay Ed25519 (see
``_recipes``). Certificates are short-lived by default: a server certificate for 90 days, client
certificates for 30; the CA for 10 years.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhealth.core import CryptoError, utcnow, write_private_file


@dataclass(frozen=True, slots=True, kw_only=True)
class PemPair:
    """A private key and its certificate, PEM-encoded."""

    key_pem: bytes
    cert_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhealth"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load(pair: PemPair) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError("the CA key is not an ECDSA key")
    return key, x509.load_pem_x509_certificate(pair.cert_pem)


def create_ca(common_name: str, *, valid_days: int = 3650, now: datetime | None = None) -> PemPair:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    now = now or utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=valid_days))
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return PemPair(key_pem=_key_pem(key), cert_pem=cert.public_bytes(serialization.Encoding.PEM))


_SIGNATURE_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _leaf(
    ca: PemPair,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    valid_days: int,
    now: datetime | None,
) -> bytes:
    ca_key, ca_cert = _load(ca)
    now = now or utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # an ECDSA key in TLS (1.2 ECDHE or 1.3) only signs the handshake: no key agreement, no cert signing
        .add_extension(_SIGNATURE_ONLY, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _general_names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue_server_certificate(
    ca: PemPair, hosts: list[str], *, valid_days: int = 90, now: datetime | None = None
) -> PemPair:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses, all placed in the SAN)."""
    if not hosts:
        raise CryptoError("a server certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        ca,
        hosts[0],
        key.public_key(),
        sans=_general_names(hosts),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        valid_days=valid_days,
        now=now,
    )
    return PemPair(key_pem=_key_pem(key), cert_pem=cert)


def issue_client_certificate(
    ca: PemPair, common_name: str, *, valid_days: int = 30, now: datetime | None = None
) -> PemPair:
    """A TLS client certificate (for optional mutual TLS) whose subject is the site or user name."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        ca,
        common_name,
        key.public_key(),
        sans=[],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_days=valid_days,
        now=now,
    )
    return PemPair(key_pem=_key_pem(key), cert_pem=cert)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """sha256 hex of the DER certificate (what ``openssl x509 -fingerprint -sha256`` shows)."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def write_private(path: Path, data: bytes) -> None:
    """Write secret material readable by the owner only (0600), atomically (:func:`write_private_file`)."""
    write_private_file(path, data)


def create_client_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new TLS client key (ECDSA P-256, generated here; it never leaves) and its CSR: (key, csr) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name)).sign(key, hashes.SHA256())
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_client_csr(
    ca: PemPair, csr_pem: bytes, *, common_name: str, valid_days: int = 30, now: datetime | None = None
) -> bytes:
    """A client certificate for the key in ``csr_pem``, for ``common_name`` whatever the CSR asks for.

    The CSR's own signature must verify (proof that the requester holds the key)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CryptoError("not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise CryptoError("the certificate signing request's signature does not verify")
    public_key = csr.public_key()
    # P-256 only, as every certificate of the federation: the CA must not vouch for a key on a weak curve
    # (P-192) or one that TLS peers may not speak (secp256k1, brainpool)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CryptoError("client certificates need an ECDSA P-256 key")
    return _leaf(
        ca,
        common_name,
        public_key,
        sans=[],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_days=valid_days,
        now=now,
    )
