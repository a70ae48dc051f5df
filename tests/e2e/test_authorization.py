"""Authorization (threat-model finding 14), against the real orchestrator process.

A researcher cannot cancel another researcher's study; a study naming a revoked or unknown site is refused at
submission; under mutual TLS a revoked site's or user's certificate is refused at once, and a certificate
must name the subject of the token it travels with.
"""

from __future__ import annotations

import httpx
import pytest
from support_services import KeyHolder, operator, synthetic_spec, tls_verify

from fedhealth.client import ClientError, OperatorClient
from fedhealth.crypto import issue_client_certificate
from fedhealth.protocol import StudyStatus
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e


def approved(fed, spec):
    """Every site the spec names approves it first (its steward's part), so the study starts at once."""
    for site in dict.fromkeys([*spec.train_sites, *spec.evaluation_sites]):
        fed.approve(site, spec)
    return spec


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("authz")) as fed:
        fed.start_orchestrator()
        fed.add_site("authz-a")
        fed.add_site("authz-r")
        fed.operator.revoke_site("authz-r")
        yield fed


def test_only_the_owner_or_an_admin_may_cancel_a_study(fed):
    rita, bob = operator(fed, "rita", "researcher"), operator(fed, "bob", "researcher")
    audrey = operator(fed, "audrey", "auditor")
    study = bob.create_study(approved(fed, synthetic_spec("bobs", ["authz-a"], owner="bob")))
    for intruder in (rita, audrey):
        with pytest.raises(ClientError) as refused:
            intruder.cancel_study(study.study_id)
        assert refused.value.status == 403
    assert refused.value.error == "role 'auditor' may not do this (needs one of: admin, researcher)"
    with pytest.raises(ClientError) as not_owner:
        rita.cancel_study(study.study_id)
    assert not_owner.value.error == "only the study's owner (bob) or an admin may cancel it"
    assert bob.study(study.study_id).status is StudyStatus.RUNNING  # untouched by the refusals
    cancelled = bob.cancel_study(study.study_id)
    assert cancelled.status is StudyStatus.CANCELLED
    assert cancelled.reason == "cancelled by bob"
    ritas = rita.create_study(approved(fed, synthetic_spec("ritas", ["authz-a"], owner="rita")))
    by_admin = fed.operator.cancel_study(ritas.study_id)
    assert by_admin.reason == "cancelled by admin"
    for client in (rita, bob, audrey):
        client.close()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"train_sites": ["authz-a", "authz-r"]}, "revoked sites cannot take part in a study: authz-r"),
        ({"eval_sites": ["authz-r"]}, "revoked sites cannot take part in a study: authz-r"),
        ({"eval_sites": ["nowhere"]}, "unknown sites: nowhere"),
        ({"train_sites": ["authz-a", "nowhere"]}, "unknown sites: nowhere"),
    ],
)
def test_a_study_naming_a_revoked_or_unknown_site_is_refused_at_submission(fed, fields, needle):
    spec = synthetic_spec("refused", ["authz-a"]).model_copy(update=fields)
    response = fed.http.post(
        "/api/v1/studies", json=spec.model_dump(mode="json"), headers=fed.admin_headers()
    )
    assert response.status_code == 422, response.text
    assert needle in str(response.json())
    # the signed submission route refuses it the same way
    with pytest.raises(ClientError) as signed:
        fed.create_study(spec, approve=False)
    assert signed.value.status == 422
    assert needle in str(signed.value)
    assert not [s for s in fed.operator.studies() if s.spec.name == "refused"]


def test_under_mutual_tls_revoked_certificates_are_refused_at_once_and_must_name_the_token_subject(tmp_path):
    with LocalFederation(tmp_path, mtls=True) as fed:
        fed.start_orchestrator()
        for site in ("m-a", "m-b"):
            fed.add_site(site)
        cert_a, cert_b = fed.site_home("m-a").client_cert(), fed.site_home("m-b").client_cert()
        a = KeyHolder(fed, "m-a", fed.site_home("m-a").identity(), client_cert=cert_a)
        b = KeyHolder(fed, "m-b", fed.site_home("m-b").identity(), client_cert=cert_b)
        token_a, token_b = a.token_headers(), b.token_headers()
        assert a.poll(token_a).status_code == 200

        # a certificate travels only with its own subject's token, and logs in only its own subject
        swapped = a.poll(token_b)
        assert swapped.status_code == 403
        assert swapped.json()["error"] == "the client certificate does not belong to the token's subject"
        with httpx.Client(base_url=fed.url, verify=tls_verify(fed, cert_a), timeout=10) as http:
            login = http.post("/api/v1/agent/challenge", json={"site": "m-b"})
            assert login.status_code == 403
            admin_login = http.post(
                "/api/v1/auth/token", json={"user": "admin", "api_key": "fhk_" + "0" * 40}
            )
            assert admin_login.status_code == 403
        admin_cert = fed._admin_cert()
        with httpx.Client(base_url=fed.url, verify=tls_verify(fed, admin_cert), timeout=10) as http:
            as_site = http.get("/api/v1/agent/tasks/next", params={"wait": 0}, headers=token_a)
            assert as_site.status_code == 403

        # a user with a certificate of the federation CA (issued by the admin offline)
        api_key = fed.operator.add_user("uma", "auditor").api_key
        uma_cert = issue_client_certificate(fed.home.ca(), "uma")
        uma_pair = (uma_cert.cert_pem, uma_cert.key_pem)
        uma = OperatorClient(
            fed.url, user="uma", api_key=api_key, ca_pem=fed.home.ca_cert.read_text(), client_cert=uma_pair
        )
        assert [s.name for s in uma.sites()] == ["m-a", "m-b"]
        fed.operator.request("POST", "/api/v1/users/uma/revoke")
        fed.operator.revoke_site("m-a")
        # refused at once, on any route, with or without a token: the CA still vouches for both certificates
        for pair, headers in ((uma_pair, {}), (cert_a, token_a)):
            with httpx.Client(base_url=fed.url, verify=tls_verify(fed, pair), timeout=10) as http:
                for response in (
                    http.get("/healthz"),
                    http.get("/openapi.json"),
                    http.get("/api/v1/agent/tasks/next", params={"wait": 0}, headers=headers),
                ):
                    assert response.status_code == 403, response.text
                    assert "revoked" in response.json()["error"]
        with pytest.raises(ClientError) as revoked:
            uma.sites()
        assert revoked.value.status == 403
        assert b.poll(token_b).status_code == 200  # the others are not affected
        for client in (a, b, uma):
            client.close()
