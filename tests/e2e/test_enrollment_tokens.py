"""The enrollment-token endpoint (``POST /api/v1/sites/{name}/enrollment-token``, ``fedhealth site token``),
against a real HTTPS orchestrator: who may call it, for which sites, what it cancels, what it logs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from support_services import KeyHolder, audit_entries, audit_text, enroll_raw, operator

from fedhealth.client import ClientError
from fedhealth.crypto import IdentityKey
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("tokens")) as fed:
        fed.start_orchestrator()
        fed.add_site("enrolled")
        yield fed


def _token(fed, name):
    return fed.operator.new_enrollment_token(name)


def test_a_new_token_for_a_pending_site_cancels_every_earlier_one_and_lives_24_hours(fed):
    first = fed.operator.add_site("pending-1").enrollment_token
    second = _token(fed, "pending-1")
    third = _token(fed, "pending-1")
    assert len({first, second.enrollment_token, third.enrollment_token}) == 3
    left = third.expires_at - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
    for stale in (first, second.enrollment_token):
        refused = enroll_raw(fed, "pending-1", stale)
        assert refused.status_code == 401
        assert refused.json()["error"] == "enrollment token is invalid, superseded, already used, or expired"
    key = IdentityKey.generate()
    assert enroll_raw(fed, "pending-1", third.enrollment_token, key).status_code == 200
    holder = KeyHolder(fed, "pending-1", key)
    assert holder.poll(holder.token_headers()).status_code == 200
    holder.close()


def test_a_token_for_one_site_does_not_enroll_another(fed):
    fed.operator.add_site("pending-2")
    fed.operator.add_site("pending-3")
    token = _token(fed, "pending-2").enrollment_token
    assert enroll_raw(fed, "pending-3", token).status_code == 401
    assert enroll_raw(fed, "pending-2", token).status_code == 200  # not spent by the failed attempt


@pytest.mark.parametrize(
    ("setup", "status", "needle"),
    [
        ("enrolled", 409, "fedhealth site rotate enrolled"),
        ("revoked", 409, "is revoked"),
        ("unknown", 404, "not registered"),
    ],
)
def test_no_token_for_an_enrolled_revoked_or_unknown_site(fed, setup, status, needle):
    name = {"enrolled": "enrolled", "revoked": "gone", "unknown": "nobody"}[setup]
    if setup == "revoked":
        fed.operator.add_site(name)
        fed.operator.revoke_site(name)
    with pytest.raises(ClientError) as refused:
        _token(fed, name)
    assert refused.value.status == status
    assert needle in refused.value.error


def test_revoking_a_pending_site_cancels_its_outstanding_token(fed):
    token = fed.operator.add_site("pending-4").enrollment_token
    fed.operator.revoke_site("pending-4")
    refused = enroll_raw(fed, "pending-4", token)
    assert refused.status_code == 401


@pytest.mark.parametrize("role", ["researcher", "auditor"])
def test_only_admins_issue_tokens(fed, role):
    fed.operator.add_site(f"pending-{role}")
    client = operator(fed, f"{role}-tokens", role)
    with pytest.raises(ClientError) as refused:
        client.new_enrollment_token(f"pending-{role}")
    assert refused.value.status == 403
    assert "needs one of: admin" in refused.value.error
    client.close()
    # nor does a site's agent token open it
    holder = KeyHolder(fed, "enrolled", fed.site_home("enrolled").identity())
    path = "/api/v1/sites/pending-researcher/enrollment-token"
    response = holder.http.post(path, headers=holder.token_headers())
    assert response.status_code == 403
    holder.close()


def test_each_token_issued_is_in_the_audit_log_without_the_token(fed):
    fed.operator.add_site("pending-5")
    issued = _token(fed, "pending-5")
    entries = [
        e
        for e in audit_entries(fed)
        if e["type"] == "site.enrollment_token_issued" and e["payload"]["site"] == "pending-5"
    ]
    assert [e["payload"]["cancelled_tokens"] for e in entries] == [0, 1]
    assert all(e["payload"]["by"] == "admin" and e["actor"] == "user:admin" for e in entries)
    assert entries[-1]["payload"]["expires_at"] == issued.expires_at.isoformat()
    assert issued.enrollment_token not in audit_text(fed)
