import ipaddress
import os
import stat
from datetime import timedelta

import numpy as np
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    ServerVerifier,
    Store,
    VerificationError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhealth.core import CryptoError, ManualClock
from fedhealth.crypto import (
    AgreementKey,
    Audience,
    IdentityKey,
    TokenExpiredError,
    TokenIssuer,
    TokenVerifier,
    aead_decrypt,
    aead_encrypt,
    create_ca,
    derive_key,
    issue_client_certificate,
    issue_server_certificate,
    keystream_uint32,
    sign_json,
    verify_json,
)


def test_a_signature_verifies_and_any_change_raises():
    key = IdentityKey.generate()
    sig = sign_json(key, {"a": 1, "b": [1, 2]})
    verify_json(key.public(), sig, {"b": [1, 2], "a": 1})  # key order does not matter
    with pytest.raises(CryptoError):
        verify_json(key.public(), sig, {"a": 2, "b": [1, 2]})
    with pytest.raises(CryptoError):
        verify_json(IdentityKey.generate().public(), sig, {"a": 1, "b": [1, 2]})
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(CryptoError):
        verify_json(key.public(), forged, {"a": 1, "b": [1, 2]})


def test_identity_key_is_saved_owner_only_and_a_world_readable_key_is_refused(tmp_path):
    key = IdentityKey.generate()
    path = tmp_path / "site.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert IdentityKey.load(path).public() == key.public()
    os.chmod(path, 0o644)
    with pytest.raises(CryptoError, match="readable by other users"):
        IdentityKey.load(path)


def test_both_sides_of_an_agreement_derive_the_same_key_and_context_separates_keys():
    a, b = AgreementKey.generate(), AgreementKey.generate()
    shared_a, shared_b = a.exchange(b.public_bytes()), b.exchange(a.public_bytes())
    ctx = {"purpose": "test", "round": 1}
    assert derive_key(shared_a, ctx) == derive_key(shared_b, ctx)
    assert derive_key(shared_a, ctx) != derive_key(shared_a, {"purpose": "test", "round": 2})
    with pytest.raises(CryptoError, match="purpose"):
        derive_key(shared_a, {"round": 1})


def test_low_order_x25519_point_is_refused():
    with pytest.raises(CryptoError):
        AgreementKey.generate().exchange(b"\x00" * 32)


@given(st.binary(max_size=256), st.binary(max_size=32))
@settings(max_examples=25)
def test_aead_round_trips_and_detects_every_single_bit_flip(plaintext, ad):
    key = os.urandom(32)
    sealed = aead_encrypt(key, plaintext, ad)
    assert aead_decrypt(key, sealed, ad) == plaintext
    flipped = bytearray(sealed)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(CryptoError):
        aead_decrypt(key, bytes(flipped), ad)
    with pytest.raises(CryptoError):
        aead_decrypt(key, sealed, ad + b"x")


def test_keystream_is_aes_ctr_of_zeros():
    seed = bytes(range(32))
    expected = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * 64)
    np.testing.assert_array_equal(keystream_uint32(seed, 16), np.frombuffer(expected, "<u4"))


def test_server_certificate_chains_to_the_ca_and_names_its_hosts():
    ca = create_ca("test federation")
    leaf = issue_server_certificate(ca, ["orchestrator.example", "127.0.0.1"])
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["orchestrator.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    client = x509.load_pem_x509_certificate(issue_client_certificate(ca, "site-a").cert_pem)
    client.verify_directly_issued_by(ca_cert)
    # Path validation as a TLS client does it (cryptography's RFC 5280 verifier), for each name in the leaf.
    for host in (DNSName("orchestrator.example"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = _server_verifier(ca_cert, host).verify(cert, [])
        assert chain == [cert, ca_cert]
    with pytest.raises(VerificationError):
        _server_verifier(ca_cert, DNSName("attacker.example")).verify(cert, [])


def test_a_ca_of_the_same_name_with_another_key_does_not_vouch_for_our_certificates():
    # The name is public; only the CA's key may make a certificate ours.
    ca = create_ca("test federation")
    server = x509.load_pem_x509_certificate(issue_server_certificate(ca, ["orchestrator.example"]).cert_pem)
    client = x509.load_pem_x509_certificate(issue_client_certificate(ca, "site-a").cert_pem)
    impostor = x509.load_pem_x509_certificate(create_ca("test federation").cert_pem)
    assert impostor.subject == x509.load_pem_x509_certificate(ca.cert_pem).subject
    for cert in (server, client):
        with pytest.raises(InvalidSignature):
            cert.verify_directly_issued_by(impostor)
    with pytest.raises(VerificationError, match="signature"):
        _server_verifier(impostor, DNSName("orchestrator.example")).verify(server, [])
    other = x509.load_pem_x509_certificate(create_ca("other").cert_pem)
    with pytest.raises(ValueError, match="does not match certificate issuer"):
        server.verify_directly_issued_by(other)


def _server_verifier(trusted: x509.Certificate, host: DNSName | IPAddress) -> ServerVerifier:
    return PolicyBuilder().store(Store([trusted])).build_server_verifier(host)


def _issuer_and_verifier(clock):
    key = IdentityKey.generate()
    return key, TokenIssuer(key, "orch", clock), TokenVerifier(key.public(), "orch", clock, leeway_s=0)


def test_token_round_trip_carries_subject_role_and_expiry():
    clock = ManualClock()
    _, issuer, verifier = _issuer_and_verifier(clock)
    token, claims = issuer.issue(
        subject="site-a", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10)
    )
    got = verifier.verify(token, Audience.AGENT)
    assert got == claims
    assert got.expires_at - got.issued_at == timedelta(minutes=10)


def test_expired_wrong_audience_foreign_key_and_tampered_tokens_are_refused():
    clock = ManualClock()
    _, issuer, verifier = _issuer_and_verifier(clock)
    token, _ = issuer.issue(subject="site-a", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10))
    with pytest.raises(CryptoError):
        verifier.verify(token, Audience.OPERATOR)
    other = TokenIssuer(IdentityKey.generate(), "orch", clock)
    forged, _ = other.issue(subject="site-a", role="site", audience=Audience.AGENT, ttl=timedelta(minutes=10))
    with pytest.raises(CryptoError) as info:
        verifier.verify(forged, Audience.AGENT)
    assert not isinstance(info.value, TokenExpiredError)
    head, body, sig = token.split(".")
    with pytest.raises(CryptoError):
        verifier.verify(f"{head}.{body}x.{sig}", Audience.AGENT)
    with pytest.raises(CryptoError):
        verifier.verify("not-a-token", Audience.AGENT)
    clock.advance(601)
    with pytest.raises(TokenExpiredError):
        verifier.verify(token, Audience.AGENT)


def test_unsigned_alg_none_token_is_refused():
    import base64
    import json

    clock = ManualClock()
    _, _, verifier = _issuer_and_verifier(clock)

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(clock.now().timestamp())
    claims = {"sub": "x", "aud": "fedhealth-agent", "iss": "orch", "iat": now, "exp": now + 60, "jti": "j"}
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    with pytest.raises(CryptoError):
        verifier.verify(token, Audience.AGENT)


@pytest.mark.parametrize("kind", ["fifo", "folder", "huge", "public-key"])
def test_an_identity_key_path_that_holds_no_key_is_one_crypto_error_and_never_blocks(tmp_path, kind):
    """A site's identity key and the orchestrator's signing key are read by IdentityKey.load: a FIFO planted
    at the path would have blocked the agent's start for ever (no writer), a folder or a file of megabytes
    raised what the reader met; each is one CryptoError, at once."""
    path = tmp_path / "identity.key"
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "folder":
        path.mkdir(mode=0o700)
    elif kind == "huge":
        path.write_bytes(b"-" * (1 << 20))
        os.chmod(path, 0o600)
    else:
        key = IdentityKey.generate().crypto_key().public_key()
        path.write_bytes(
            key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        os.chmod(path, 0o600)
    with pytest.raises(CryptoError) as refused:
        IdentityKey.load(path)
    assert str(path) in str(refused.value)
