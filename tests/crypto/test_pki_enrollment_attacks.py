"""The federation's PKI, enrollment and key files against an attacker (docs/security.md, "The federation's own
PKI", "Sites", "Mutual TLS"): a malicious site asking the CA for more than a client certificate, a network
attacker presenting certificates the CA did not issue for this purpose, a local account planting a key, and
tokens after the orchestrator's signing key was replaced. What test_recipes.py, test_token_attacks.py,
test_stale_credential_attacks.py and the e2e identity/takeover/enrollment tests do not already try.

- The CA signs a CSR only for an ECDSA P-256 key the requester proves it holds, and whatever the CSR asks
  for (another site's name, a wildcard, CA:TRUE, certificate signing) it issues a 30-day client-only
  certificate naming the enrolling site; a refused CSR does not spend the site's enrollment token.
- Under mutual TLS the orchestrator's TLS listener (uvicorn with the options ``_serve`` gives it) refuses at
  the handshake an expired or not yet valid certificate, one from another CA with the same subject, the
  orchestrator's own server certificate, and a certificate that a site signed with its client key.
- ``IdentityKey.load`` refuses a key file another account owns (directly or through a symbolic link);
  keys are written 0600 with no window of a wider mode under any umask, replacing a planted link.
- A site name that differs from a real one only by case, Unicode or whitespace is refused at the schema.
- Under mutual TLS a site's certificate does not carry another site's enrollment token (403).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from fedhealth.core import CryptoError, ManualClock, canonical_json, utcnow
from fedhealth.crypto import (
    Audience,
    IdentityKey,
    PemPair,
    TokenClaims,
    certificate_fingerprint,
    create_ca,
    create_client_csr,
    issue_client_certificate,
    issue_server_certificate,
    pinned_tls_context,
    sign_client_csr,
    write_private,
)
from fedhealth.orchestrator import (
    AuthService,
    OrchestratorSettings,
    Store,
    create_app,
    default_extensions,
    make_engine,
    sqlite_url,
    start_service,
    upgrade_database,
)
from fedhealth.orchestrator._auth import Principal, Unauthenticated
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_admin import register_site
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.orchestrator._serve import _with_client_certificate
from fedhealth.protocol import EnrollRequest, Role, SiteCreate, agent_login_message
from support import TestClient

HOST = "orchestrator.example"


@pytest.fixture(scope="module")
def ca() -> PemPair:
    return create_ca("test federation")


def _csr(key: Any, subject: str, *extensions: tuple[x509.ExtensionType, bool]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


# --- what the CA signs --------------------------------------------------------------------------------------

WEAK_OR_FOREIGN_KEYS = {
    "ecdsa-p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "ecdsa-p224": lambda: ec.generate_private_key(ec.SECP224R1()),
    "ecdsa-secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "ecdsa-brainpool-p256": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
    "rsa-1024": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("kind", sorted(WEAK_OR_FOREIGN_KEYS))
def test_a_csr_for_a_weak_or_other_kind_of_key_gets_no_certificate(ca, kind):
    csr = _csr(WEAK_OR_FOREIGN_KEYS[kind](), "site-a")
    with pytest.raises(CryptoError, match="P-256"):
        sign_client_csr(ca, csr, common_name="site-a")


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + content


def test_a_csr_carrying_one_key_but_signed_by_another_gets_no_certificate(ca):
    # The request names the victim's public key (its certificate would then be the victim's) but the
    # attacker can only sign with its own key: no proof of possession.
    victim, attacker = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    info = x509.load_pem_x509_csr(_csr(victim, "site-a")).tbs_certrequest_bytes
    signature = attacker.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_with_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    forged = _der(0x30, info + ecdsa_with_sha256 + _der(0x03, b"\x00" + signature))
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n"
    pem += base64.encodebytes(forged) + b"-----END CERTIFICATE REQUEST-----\n"
    assert (
        x509.load_pem_x509_csr(pem).public_key() == victim.public_key()
    )  # well-formed, only the proof fails
    with pytest.raises(CryptoError, match="does not verify"):
        sign_client_csr(ca, pem, common_name="site-a")


def test_a_csr_asking_for_another_site_a_wildcard_or_a_ca_gets_a_plain_client_certificate_for_its_site(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = _csr(
        key,
        "site-a",
        (x509.SubjectAlternativeName([x509.DNSName("*.example"), x509.DNSName("site-a")]), False),
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
            ),
            False,
        ),
    )
    before = utcnow()
    cert = x509.load_pem_x509_certificate(sign_client_csr(ca, greedy, common_name="site-b"))
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-b"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["site-b"]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    oids = {e.oid for e in cert.extensions}
    assert x509.SubjectAlternativeName.oid not in oids
    _assert_signature_only(cert)
    lifetime = cert.not_valid_after_utc - before
    assert timedelta(days=30) - timedelta(minutes=1) <= lifetime <= timedelta(days=30, minutes=1)
    assert cert.not_valid_before_utc <= before


def _assert_signature_only(cert: x509.Certificate) -> None:
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    allowed = ("digital_signature",)
    others = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    assert [name for name in allowed + others if getattr(usage.value, name)] == ["digital_signature"]
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign


def test_every_leaf_certificate_the_ca_issues_may_only_sign_a_handshake(ca):
    # a leaf's key cannot sign certificates or CRLs, nor be used for key agreement or encryption, whatever
    # path issued it: a server certificate, a client certificate made here, one signed from a site's CSR
    key = ec.generate_private_key(ec.SECP256R1())
    issued = [
        issue_server_certificate(ca, ["localhost", "127.0.0.1"]).cert_pem,
        issue_client_certificate(ca, "site-a").cert_pem,
        sign_client_csr(ca, _csr(key, "site-a"), common_name="site-a"),
    ]
    for pem in issued:
        _assert_signature_only(x509.load_pem_x509_certificate(pem))
    # the CA itself keeps certificate signing
    ca_usage = x509.load_pem_x509_certificate(ca.cert_pem).extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.value.key_cert_sign


def test_a_refused_csr_does_not_spend_the_token_and_the_certificate_names_the_tokens_site(tmp_path, ca):
    admin = Principal(
        name="admin",
        role=Role.ADMIN,
        claims=TokenClaims(
            subject="admin",
            role="admin",
            audience=Audience.OPERATOR,
            issued_at=datetime.now(UTC),
            expires_at=datetime.now(UTC) + timedelta(minutes=5),
            token_id="t",
        ),
    )

    async def main() -> None:
        settings = OrchestratorSettings(
            state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), ca=ca
        )
        svc = await start_service(settings, default_extensions())
        try:
            register_site(svc, admin, SiteCreate(name="site-a"))
            token = register_site(svc, admin, SiteCreate(name="site-b")).enrollment_token
            public = IdentityKey.generate().public().raw.hex()
            weak = _csr(ec.generate_private_key(ec.SECP192R1()), "site-b").decode()
            with pytest.raises(ApiError) as refused:
                enroll_site(svc, EnrollRequest(site="site-b", token=token, public_key=public, tls_csr=weak))
            assert refused.value.status == 422
            assert svc.store.get_site("site-b").public_key is None
            # the same token still enrolls, with a CSR that names the other site: the certificate is site-b's
            _, csr = create_client_csr("site-a")
            enrolled = enroll_site(
                svc, EnrollRequest(site="site-b", token=token, public_key=public, tls_csr=csr.decode())
            )
            assert enrolled.tls_certificate is not None
            cert = x509.load_pem_x509_certificate(enrolled.tls_certificate.encode())
            assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["site-b"]
            row = svc.store.get_site("site-b")
            assert row.cert_fingerprint == certificate_fingerprint(enrolled.tls_certificate.encode())
            assert svc.store.get_site("site-a").cert_fingerprint is None
        finally:
            await svc.close()

    asyncio.run(main())


# --- what the orchestrator's mutual-TLS listener lets through -------------------------------------------


def _server_context(tmp_path: Path, ca: PemPair, server: PemPair) -> ssl.SSLContext:
    """The context uvicorn builds from the options ``orchestrator._serve`` gives it under ``--mtls``."""
    files = {"ca.pem": ca.cert_pem, "tls.pem": server.cert_pem, "tls.key": server.key_pem}
    for name, data in files.items():
        write_private(tmp_path / name, data)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never called: only the handshake runs
        raise AssertionError("no request")

    config = uvicorn.Config(
        app,
        ssl_certfile=str(tmp_path / "tls.pem"),
        ssl_keyfile=str(tmp_path / "tls.key"),
        ssl_ca_certs=str(tmp_path / "ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    config.load()
    assert config.ssl is not None
    return config.ssl


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """Run a TLS handshake in memory; the client certificate the server accepted (DER), or ssl.SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=HOST)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    peer = server.getpeercert(binary_form=True)
    assert peer is not None
    return peer


def _site_signed_certificate(ca: PemPair) -> tuple[bytes, bytes]:
    """A certificate for "admin" that a malicious site signed with its own client key, with its chain."""
    site = issue_client_certificate(ca, "site-a")
    site_key = serialization.load_pem_private_key(site.key_pem, password=None)
    site_cert = x509.load_pem_x509_certificate(site.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .issuer_name(site_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(site_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = forged.public_bytes(serialization.Encoding.PEM) + site.cert_pem
    return chain, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


FOREIGN_CLIENT_CERTIFICATES = {
    "expired": lambda ca: issue_client_certificate(ca, "site-a", now=utcnow() - timedelta(days=31)),
    "not-yet-valid": lambda ca: issue_client_certificate(ca, "site-a", now=utcnow() + timedelta(days=1)),
    "another-ca-same-subject": lambda ca: issue_client_certificate(create_ca("test federation"), "site-a"),
    "the-orchestrators-server-certificate": lambda ca: issue_server_certificate(ca, ["site-a"]),
}


@pytest.mark.parametrize("kind", [*sorted(FOREIGN_CLIENT_CERTIFICATES), "signed-by-a-sites-client-key"])
def test_the_mutual_tls_listener_refuses_certificates_the_ca_did_not_issue_for_a_current_client(
    tmp_path, ca, kind
):
    server_ctx = _server_context(tmp_path, ca, issue_server_certificate(ca, [HOST]))
    genuine = issue_client_certificate(ca, "site-a")
    accepted = _handshake(
        server_ctx, pinned_tls_context(ca.cert_pem, client_cert=(genuine.cert_pem, genuine.key_pem))
    )
    assert accepted == x509.load_pem_x509_certificate(genuine.cert_pem).public_bytes(
        serialization.Encoding.DER
    )
    if kind == "signed-by-a-sites-client-key":
        presented = _site_signed_certificate(ca)
    else:
        pair = FOREIGN_CLIENT_CERTIFICATES[kind](ca)
        presented = (pair.cert_pem, pair.key_pem)
    with pytest.raises(ssl.SSLError):
        _handshake(server_ctx, pinned_tls_context(ca.cert_pem, client_cert=presented))


# --- key files ---------------------------------------------------------------------------------------------


def _owned_by_another_account(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` another account's file: really (as root), or by running as another uid."""
    if os.getuid() == 0:
        os.chown(path, 65534, 65534, follow_symlinks=False)
    else:
        me = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: me + 1)
        monkeypatch.setattr(os, "geteuid", lambda: me + 1)


@pytest.mark.parametrize("planted", ["at-the-key-path", "behind-a-symbolic-link"])
def test_a_key_file_another_account_owns_is_refused_with_one_line(tmp_path, monkeypatch, planted):
    theirs = tmp_path / ("site.key" if planted == "at-the-key-path" else "their.key")
    IdentityKey.generate().save(theirs)
    assert IdentityKey.load(theirs)  # the control: the same file, ours, loads
    path = tmp_path / "site.key"
    if planted == "behind-a-symbolic-link":
        path.symlink_to(theirs)
    _owned_by_another_account(theirs, monkeypatch)
    with pytest.raises(CryptoError, match="owned by another") as refused:
        IdentityKey.load(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("writer", ["identity-key", "ca-key"])
def test_keys_are_written_0600_with_no_wider_window_under_any_umask_and_replace_a_planted_link(
    tmp_path, monkeypatch, writer
):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    path = tmp_path / "home" / "secret.key"
    path.parent.mkdir()
    path.symlink_to(victim)
    seen: list[int] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        seen.append(stat.S_IMODE(os.lstat(src).st_mode))  # the file as it is before it takes the name
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(0)
    try:
        if writer == "identity-key":
            IdentityKey.generate().save(path)
        else:
            write_private(path, create_ca("test federation").key_pem)
    finally:
        os.umask(old)
    assert seen == [0o600]
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert victim.read_text() == "someone else's file"
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary file left behind


# --- names and tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lookalike",
    [
        "Site-a",
        "SITE-A",
        " site-a",
        "site-a ",
        "site-a\n",
        "site-a\t",
        "s\u0456te-a",
        "\uff53ite-a",
        "site-a\u200b",
        "site\u2011a",
    ],
)
def test_a_site_name_differing_from_a_real_one_by_case_unicode_or_whitespace_is_refused(lookalike):
    key = IdentityKey.generate().public().raw.hex()
    with pytest.raises(ValidationError):
        SiteCreate(name=lookalike)
    with pytest.raises(ValidationError):
        EnrollRequest(site=lookalike, token="fhe_" + "t" * 43, public_key=key)
    assert SiteCreate(name="site-a").name == "site-a"  # the control


def test_tokens_signed_before_the_orchestrators_signing_key_was_replaced_are_refused(tmp_path):
    engine = make_engine(sqlite_url(tmp_path / "o.sqlite"))
    upgrade_database(engine)
    try:
        store, clock = Store(engine), ManualClock(datetime.now(UTC).replace(microsecond=0))
        old = AuthService(store, IdentityKey.generate(), clock)
        site_key = IdentityKey.generate()
        store.create_site("site-a", clock.now())
        old.enroll(
            site="site-a",
            token=old.enrollment_token("site-a").token,
            public_key_hex=site_key.public().raw.hex(),
        )
        api_key = old.new_user("alice", Role.RESEARCHER)
        challenge, _ = old.challenge("site-a")
        signature = site_key.sign(canonical_json(agent_login_message("site-a", challenge))).hex()
        agent, _ = old.agent_token(site="site-a", challenge=challenge, signature_hex=signature)
        operator, _ = old.operator_token(user="alice", api_key=api_key)
        assert old.authenticate(f"Bearer {agent}", Audience.AGENT).name == "site-a"  # the control
        new = AuthService(store, IdentityKey.generate(), clock)
        for token, audience in ((agent, Audience.AGENT), (operator, Audience.OPERATOR)):
            with pytest.raises(Unauthenticated, match="invalid token"):
                new.authenticate(f"Bearer {token}", audience)
    finally:
        engine.dispose()


# --- enrollment under mutual TLS ----------------------------------------------------------------------------


def test_under_mtls_a_sites_certificate_cannot_carry_another_sites_enrollment_token(tmp_path, ca):
    # The certificate names the principal on every login route: site-a's connection may not enroll site-b,
    # though it holds site-b's token (a token stolen by a site that is already in the federation).
    settings = OrchestratorSettings(
        state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), ca=ca, rate_per_s=0
    )
    app = create_app(settings, extensions=default_extensions())
    with TestClient(app, base_url="https://testserver") as plain:
        svc = app.state.services
        admin = Principal(
            name="admin",
            role=Role.ADMIN,
            claims=TokenClaims(
                subject="admin",
                role="admin",
                audience=Audience.OPERATOR,
                issued_at=datetime.now(UTC),
                expires_at=datetime.now(UTC) + timedelta(minutes=5),
                token_id="t",
            ),
        )
        tokens = {
            s: register_site(svc, admin, SiteCreate(name=s)).enrollment_token for s in ("site-a", "site-b")
        }

        def enrollment(site: str) -> dict[str, str]:
            return {
                "site": site,
                "token": tokens[site],
                "public_key": IdentityKey.generate().public().raw.hex(),
                "tls_csr": create_client_csr(site)[1].decode(),
            }

        enrolled = plain.post("/api/v1/enroll", json=enrollment("site-a"))
        assert enrolled.status_code == 200, enrolled.text
        site_a = TestClient(_with_client_certificate(app, enrolled.json()["tls_certificate"]))
        refused = site_a.post("https://testserver/api/v1/enroll", json=enrollment("site-b"))
        assert refused.status_code == 403, refused.text
        assert svc.store.get_site("site-b").public_key is None
        # the control: without a certificate (the enrollment listener) the token is good and unspent
        assert plain.post("/api/v1/enroll", json=enrollment("site-b")).status_code == 200
