"""Clients and their transport (threat-model finding 15): the operator client, the agent client, enrollment
and the CLI refuse to send a credential over plain ``http://`` unless told ``--insecure``, and an upper-case
``HTTPS://`` URL still pins the federation CA.

The network attacker is a listener on loopback that records every byte it receives; for the TLS case it has
a certificate from a CA the system trusts (``SSL_CERT_FILE``), as a public CA that mis-issued would be.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support_services import recording_listener

from fedhealth.agent import OrchestratorClient, TlsVerificationError, enroll_site
from fedhealth.client import ClientError, OperatorClient
from fedhealth.core import ConfigError
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.protocol import OperatorCredential
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e
API_KEY = "fhk_" + "s" * 43
FEDERATION_CA = create_ca("the federation").cert_pem


def _operator_call(url, **kwargs):
    client = OperatorClient(url, user="admin", api_key=API_KEY, ca_pem=FEDERATION_CA.decode(), **kwargs)
    try:
        client.sites()
    finally:
        client.close()


def _agent_call(url, key, **kwargs):
    client = OrchestratorClient(url, "north", key, ca_pem=FEDERATION_CA, **kwargs)
    try:
        client.next_task(0)
    finally:
        client.close()


def _enroll(url, tmp_path, **kwargs):
    enroll_site(
        tmp_path / "site", name="north", orchestrator=url, token=API_KEY, ca_pem=FEDERATION_CA, **kwargs
    )


@pytest.mark.parametrize("scheme", ["http", "HTTP", "Http"])
def test_no_client_sends_a_credential_over_plain_http_without_insecure(tmp_path, scheme):
    key = IdentityKey.generate()
    with recording_listener() as listener:
        url = listener.url(scheme)
        for call in (
            lambda: _operator_call(url),
            lambda: _agent_call(url, key),
            lambda: _enroll(url, tmp_path),
        ):
            with pytest.raises(ConfigError, match="--insecure"):
                call()
        assert listener.connections == 0
        assert API_KEY.encode() not in listener.received
    assert not (tmp_path / "site").exists()


def test_with_insecure_the_clients_do_use_plain_http(tmp_path):
    with recording_listener() as listener:
        url = listener.url("http")
        with pytest.raises(ClientError) as answered:  # the listener answers 500 and nothing else
            _operator_call(url, insecure=True)
        assert answered.value.status == 500
        assert b"POST /api/v1/auth/token" in listener.received


@pytest.mark.parametrize("scheme", ["HTTPS", "Https", "https"])
def test_an_https_url_in_any_case_pins_the_federation_ca(tmp_path, monkeypatch, scheme):
    key = IdentityKey.generate()
    with recording_listener(tls=True) as attacker:
        trusted = tmp_path / "system-ca.pem"
        assert attacker.ca is not None
        trusted.write_bytes(attacker.ca.cert_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(trusted))  # the system trusts the attacker's CA
        url = attacker.url(scheme)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _operator_call(url)
        with pytest.raises(TlsVerificationError):
            _agent_call(url, key)
        with pytest.raises(TlsVerificationError):
            _enroll(url, tmp_path)
        assert b"api" not in attacker.received  # no request line (nor any credential) crossed
        assert API_KEY.encode() not in attacker.received


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "127.0.0.1:8443", "", "file:///etc/passwd"])
def test_urls_that_are_not_http_or_https_are_refused(url):
    # imported here, so that the rest of the module also runs against code that lacks it
    from fedhealth.crypto import client_tls_for_url

    with pytest.raises(ConfigError):
        client_tls_for_url(url, FEDERATION_CA, insecure=True)


def _cli(*args: str, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhealth", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_the_cli_refuses_plain_http_without_insecure_and_works_with_it(tmp_path):
    with LocalFederation(tmp_path / "fed", tls=False) as fed:
        fed.start_orchestrator()
        fed.add_site("plain-site")  # the simulator enrolls with insecure=True over plain HTTP
        credential = Path(fed.home.admin_credential)
        assert OperatorCredential.model_validate_json(credential.read_text()).api_key
        with recording_listener() as listener:
            refused = _cli(
                "site", "list", "--credential", str(credential), "--orchestrator", listener.url("http")
            )
            assert refused.returncode == 1
            assert "--insecure" in refused.stderr
            assert listener.connections == 0
        listed = _cli(
            "site", "list", "--credential", str(credential), "--orchestrator", fed.url, "--insecure"
        )
        assert listed.returncode == 0, listed.stderr
        assert "plain-site\tactive" in listed.stdout
        # the agent too: without --insecure it refuses to start, with it (as the simulator runs it) it polls
        home = fed.site_home("plain-site").root
        agent = _cli("site", "serve", "--home", str(home), "--orchestrator", fed.url)
        assert agent.returncode == 1
        assert "refusing to send credentials over plain HTTP" in agent.stderr
        fed.start_agent("plain-site", {})
        fed.wait_for_sites(["plain-site"])
