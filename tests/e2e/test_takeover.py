"""Site takeover (threat-model finding 9), against a real orchestrator and a real agent.

An attacker who got hold of an enrollment token that was superseded, or that was issued for a site already
enrolled, tries to register its own key for that site: it must be refused (401 / 409), the real site must keep
working, and only an admin's explicit rotation may retire the site's key, its tokens and its certificate.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa
from support_services import KeyHolder, audit_entries, enroll_raw, operator, synthetic_spec, tls_verify

from fedhealth.agent import enroll_site
from fedhealth.client import ClientError
from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator import make_engine
from fedhealth.orchestrator._db import enrollment_tokens
from fedhealth.orchestrator._home import secret_hash
from fedhealth.protocol import StudyStatus
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("takeover")) as fed:
        fed.start_orchestrator()
        yield fed


def _site_key(fed, name):
    return fed.site_home(name).identity()


def test_a_superseded_enrollment_token_cannot_enroll_and_the_real_site_keeps_its_key(fed):
    stale = fed.operator.add_site("north").enrollment_token
    current = fed.operator.new_enrollment_token("north").enrollment_token  # the first one was "lost"
    attacker = IdentityKey.generate()
    refused = enroll_raw(fed, "north", stale, attacker)
    assert refused.status_code == 401, refused.text
    assert "superseded" in refused.json()["error"]
    fed.enroll("north", current)  # the real site, with the token it was given last
    assert enroll_raw(fed, "north", stale, attacker).status_code == 401
    assert enroll_raw(fed, "north", current, attacker).status_code == 401  # spent on use
    # the attacker's key opens nothing; the real key works
    intruder = KeyHolder(fed, "north", attacker)
    assert intruder.login().status_code == 401
    intruder.close()
    real = KeyHolder(fed, "north", _site_key(fed, "north"))
    assert real.poll(real.token_headers()).status_code == 200
    real.close()


def test_an_enrolled_site_is_never_enrolled_again_even_with_a_valid_token(fed):
    fed.add_site("south")
    # an admin cannot hand out a token for an enrolled site: re-keying is an explicit rotation
    with pytest.raises(ClientError) as issued:
        fed.operator.new_enrollment_token("south")
    assert issued.value.status == 409
    assert "rotate" in issued.value.error
    # a token for the enrolled site that is valid all the same (as the old main issued them): written
    # straight into the orchestrator's database
    token = "fhe_" + "t" * 43
    engine = make_engine(fed.home.database_url())
    now = datetime.now(UTC)
    with engine.begin() as c:
        c.execute(
            sa.insert(enrollment_tokens).values(
                token_hash=secret_hash(token),
                site="south",
                created_at=now,
                expires_at=now + timedelta(hours=1),
                used_at=None,
            )
        )
    engine.dispose()
    attacker = IdentityKey.generate()
    refused = enroll_raw(fed, "south", token, attacker)
    assert refused.status_code == 409, refused.text
    assert "already enrolled" in refused.json()["error"]
    assert set(refused.json()) == {"error", "detail"}
    intruder = KeyHolder(fed, "south", attacker)
    assert intruder.login().status_code == 401
    intruder.close()
    real = KeyHolder(fed, "south", _site_key(fed, "south"))
    assert real.poll(real.token_headers()).status_code == 200
    real.close()


def test_the_real_agent_is_locked_out_only_by_an_explicit_rotation_which_retires_its_key_at_once(
    fed, tmp_path
):
    fed.add_site("east")
    fed.start_agent("east", {})
    fed.wait_for_sites(["east"])
    agent = fed.agents["east"]
    # takeover attempts: a superseded token, a fresh token for the enrolled site; none reaches the agent
    for _ in range(3):
        assert enroll_raw(fed, "east", "fhe_" + "x" * 43).status_code == 401
    with pytest.raises(ClientError):
        fed.operator.new_enrollment_token("east")
    # the real agent still works: it trains a study to the end
    study = fed.create_study(synthetic_spec("after-attempts", ["east"], rounds=1))
    assert fed.wait_for_study(study.study_id, timeout=120).status is StudyStatus.COMPLETED
    assert agent.poll() is None, "the agent stopped without a rotation"
    holder = KeyHolder(fed, "east", _site_key(fed, "east"))
    old_token = holder.token_headers()  # issued for the current key, valid for ten minutes
    assert holder.poll(old_token).status_code == 200

    rotated = fed.operator.rotate_site("east")
    refused = holder.poll(old_token)
    assert refused.status_code == 401, refused.text  # at once, not when the token expires
    assert holder.login().status_code == 401  # the old key cannot log in any more
    # the rotation woke the agent's waiting long poll (its wait is 25 s), which was refused then
    deadline = time.monotonic() + 10
    while agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.returncode == 3, "the agent's waiting poll was not refused at the rotation"
    assert "refuses this site" in (fed.logs / "agent-east.log").read_text()

    # the site enrolls a new key with the rotation's token (once); the old key's token stays dead
    new_key = IdentityKey.generate()
    assert enroll_raw(fed, "east", rotated.enrollment_token, new_key).status_code == 200
    assert enroll_raw(fed, "east", rotated.enrollment_token).status_code == 401
    assert holder.poll(old_token).status_code == 401
    renewed = KeyHolder(fed, "east", new_key)
    assert renewed.poll(renewed.token_headers()).status_code == 200
    renewed.close()
    holder.close()
    [entry] = [e for e in audit_entries(fed) if e["type"] == "site.rotated"]
    assert entry["payload"]["site"] == "east"
    assert entry["payload"]["by"] == "admin"
    assert entry["payload"]["old_key"] == _site_key(fed, "east").public().raw.hex()
    assert entry["actor"] == "user:admin"


def test_rotation_is_for_enrolled_sites_and_only_for_admins(fed):
    fed.operator.add_site("west")  # pending: nothing to rotate
    with pytest.raises(ClientError) as pending:
        fed.operator.rotate_site("west")
    assert pending.value.status == 409
    with pytest.raises(ClientError) as unknown:
        fed.operator.rotate_site("nowhere")
    assert unknown.value.status == 404
    rita = operator(fed, "rita-rotates", "researcher")
    with pytest.raises(ClientError) as researcher:
        rita.rotate_site("north")
    assert researcher.value.status == 403
    rita.close()


def test_under_mutual_tls_a_rotation_retires_the_old_client_certificate_at_once(tmp_path):
    with LocalFederation(tmp_path, mtls=True) as fed:
        fed.start_orchestrator()
        fed.add_site("m-north")
        home = fed.site_home("m-north")
        old_cert = home.client_cert()
        assert old_cert is not None
        holder = KeyHolder(fed, "m-north", home.identity(), client_cert=old_cert)
        headers = holder.token_headers()
        assert holder.poll(headers).status_code == 200
        holder.close()
        with httpx.Client(verify=tls_verify(fed, old_cert), timeout=10) as http:
            assert http.get(f"{fed.url}/healthz").status_code == 200

        rotated = fed.operator.rotate_site("m-north")
        # the CA still vouches for the old certificate, but it is not the site's any more: refused at once,
        # on every route, with or without a token
        with httpx.Client(verify=tls_verify(fed, old_cert), timeout=10) as http:
            for response in (
                http.get(f"{fed.url}/healthz"),
                http.post(f"{fed.url}/api/v1/agent/challenge", json={"site": "m-north"}),
                http.get(f"{fed.url}/api/v1/agent/tasks/next", params={"wait": 0}, headers=headers),
            ):
                assert response.status_code == 403, response.text
                assert "latest enrollment" in response.json()["error"]
        # the site enrolls again (new key, new certificate, over the enrollment listener)
        fresh = tmp_path / "m-north-2"
        enrolled = enroll_site(
            fresh,
            name="m-north",
            orchestrator=fed.enroll_url,
            token=rotated.enrollment_token,
            ca_pem=fed.home.ca_cert.read_bytes(),
        )
        new_cert = enrolled.client_cert()
        assert new_cert is not None
        assert new_cert != old_cert
        renewed = KeyHolder(fed, "m-north", enrolled.identity(), client_cert=new_cert)
        assert renewed.poll(renewed.token_headers()).status_code == 200
        renewed.close()
        with httpx.Client(verify=tls_verify(fed, old_cert), timeout=10) as http:
            assert http.get(f"{fed.url}/healthz").status_code == 403


def test_the_cli_rotates_a_site_and_prints_the_token_for_its_new_key(fed):
    fed.add_site("cli-site")
    rotated = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhealth",
            "site",
            "rotate",
            "cli-site",
            "--credential",
            str(fed.home.admin_credential),
            "--orchestrator",
            fed.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rotated.returncode == 0, rotated.stderr
    token = rotated.stdout.strip()
    assert token.startswith("fhe_")
    assert "its old key is retired" in rotated.stderr
    assert enroll_raw(fed, "cli-site", token).status_code == 200
