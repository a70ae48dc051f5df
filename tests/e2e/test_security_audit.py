"""Security actions in the orchestrator's signed audit log (threat-model finding 13), against the real
orchestrator process.

Every identity and authorization action an operator takes (sites created, enrollment tokens issued, sites
rotated and revoked, users created, re-keyed and revoked, studies cancelled) is an entry in the one audit log
the orchestrator signs, naming who did it, and the log still verifies. No secret is ever written to it.
"""

from __future__ import annotations

import pytest
from support_services import audit_entries, audit_text, enroll_raw, operator, synthetic_spec

from fedhealth.client import ClientError
from fedhealth.crypto import IdentityKey
from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e


def _of(entries, kind, **match):
    return [
        e for e in entries if e["type"] == kind and all(e["payload"].get(k) == v for k, v in match.items())
    ]


def test_every_security_action_is_a_signed_audit_entry_naming_who_did_it(tmp_path):
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        admin = fed.operator
        secrets: list[str] = []
        secrets.append(admin.add_site("aud-site").enrollment_token)
        token = admin.new_enrollment_token("aud-site").enrollment_token
        secrets.append(token)
        key = IdentityKey.generate()
        assert enroll_raw(fed, "aud-site", token, key).status_code == 200
        rotated = admin.rotate_site("aud-site")
        secrets.append(rotated.enrollment_token)
        admin.revoke_site("aud-site")
        rita_key = admin.add_user("rita", "researcher").api_key
        new_key = admin.new_api_key("rita").api_key
        secrets += [rita_key, new_key]
        admin.add_site("aud-other")
        rita = operator(fed, "rita-2", "researcher")
        study = rita.create_study(synthetic_spec("audited", ["aud-other"], owner="rita-2"))
        rita.cancel_study(study.study_id)
        rita.close()
        admin.request("POST", "/api/v1/users/rita/revoke")

        entries = audit_entries(fed)
        expected = [
            ("site.created", {"site": "aud-site"}, "admin"),
            ("site.enrollment_token_issued", {"site": "aud-site", "cancelled_tokens": 0}, "admin"),
            ("site.enrollment_token_issued", {"site": "aud-site", "cancelled_tokens": 1}, "admin"),
            ("site.rotated", {"site": "aud-site", "old_key": key.public().raw.hex()}, "admin"),
            ("site.revoked", {"site": "aud-site"}, "admin"),
            ("user.created", {"user": "rita", "role": "researcher"}, "admin"),
            ("user.key_changed", {"user": "rita"}, "admin"),
            ("user.revoked", {"user": "rita"}, "admin"),
            ("study.cancelled", {"study_id": study.study_id, "reason": "cancelled by rita-2"}, "rita-2"),
        ]
        for kind, match, who in expected:
            found = _of(entries, kind, **match)
            assert len(found) == 1, (kind, match, [e for e in entries if e["type"] == kind])
            assert found[0]["payload"]["by"] == who
            assert found[0]["actor"] == f"user:{who}"
        # the enrollment itself, with the key and the site as actor
        [enrolled] = _of(entries, "enrollment", site="aud-site")
        assert enrolled["payload"]["public_key"] == key.public().raw.hex()
        assert enrolled["actor"] == "site:aud-site"
        # in order, and the log verifies against the orchestrator's key
        kinds = [e["type"] for e in entries if e["type"].startswith("site.") and "aud-site" in str(e)]
        assert kinds == [
            "site.created",
            "site.enrollment_token_issued",
            "site.enrollment_token_issued",
            "site.rotated",
            "site.revoked",
        ]
        verified = admin.request("GET", "/api/v1/governance/audit/verify").json()
        assert verified["ok"], verified
        text = audit_text(fed)
        for secret in secrets:
            assert secret not in text


def test_a_refused_action_writes_no_entry(tmp_path):
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        fed.add_site("enrolled-site")
        before = len(audit_entries(fed))
        with pytest.raises(ClientError):
            fed.operator.new_enrollment_token("enrolled-site")  # 409: enrolled
        with pytest.raises(ClientError):
            fed.operator.add_site("enrolled-site")  # 409: exists
        with pytest.raises(ClientError):
            fed.operator.rotate_site("nobody")  # 404
        assert len(audit_entries(fed)) == before
