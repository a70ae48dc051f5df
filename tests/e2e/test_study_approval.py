"""A study waits in awaiting_approval until every site it names has approved its exact spec, through the real
services: an orchestrator and two agents as processes, the stewards using the command line.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.governance import spec_hash
from fedhealth.protocol import ApprovalState, StudyInfo, StudySpec, StudyStatus
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec

pytestmark = pytest.mark.e2e
runner = CliRunner()
SITES = ["alpha", "beta"]


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("approval"), log_level="warning") as fed:
        fed.start_orchestrator()
        for site, uri in zip(SITES, (BREAST_SITES["hospital-a"], BREAST_SITES["hospital-b"]), strict=True):
            fed.add_site(site)
            fed.start_agent(site, {"breast-cancer": uri}, extra_args=["--poll-wait", "2"])
        fed.add_site("bystander")
        fed.wait_for_sites(SITES)
        yield fed


def steward(fed: LocalFederation, site: str, spec: StudySpec, verb: str = "approve") -> Any:
    """What a site's data steward types: show the spec, then decide on it."""
    digest = spec_hash(spec.model_dump(mode="json"))
    home = fed.site_home(site).root
    shown = cli("site", "approvals", "show", digest[:16], "--home", home)
    assert shown.exit_code == 0, shown.output
    result = cli("site", verb, digest[:16], "--reason", "IRB-2026-12", "--home", home)
    assert result.exit_code == 0, result.output
    return result


def wait_until(fed: LocalFederation, study_id: str, check: Any, timeout: float = 30) -> StudyInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = fed.study(study_id)
        if check(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_a_study_waits_for_every_named_site_and_runs_once_all_approved(fed):
    spec = breast_spec(SITES, rounds=2, name="waits")
    study = fed.create_study(spec, approve=False)
    assert study.status is StudyStatus.AWAITING_APPROVAL
    assert study.approvals == {"alpha": ApprovalState.PENDING, "beta": ApprovalState.PENDING}
    assert study.spec_hash == spec_hash(spec.model_dump(mode="json"))
    assert study.rounds == []  # no round, so no task reaches a site before the approvals
    # a steward sees the spec awaiting the site (fetched from the orchestrator) before deciding
    listed = cli("site", "approvals", "--home", fed.site_home("beta").root)
    assert f"{study.spec_hash}  pending" in listed.stdout
    steward(fed, "alpha", spec)
    info = fed.study(study.study_id)
    assert info.status is StudyStatus.AWAITING_APPROVAL
    assert info.approvals == {"alpha": ApprovalState.APPROVED, "beta": ApprovalState.PENDING}
    assert info.rounds == []
    steward(fed, "beta", spec)
    final = fed.wait_for_study(study.study_id, timeout=120)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert [r.number for r in final.rounds] == [1, 2, 3]


def test_a_site_that_is_not_named_is_not_offered_the_spec(fed):
    spec = breast_spec(SITES, rounds=1, name="not-yours")
    study = fed.create_study(spec, approve=False)
    listed = cli("site", "approvals", "--home", fed.site_home("bystander").root, "--json")
    assert listed.exit_code == 0, listed.output
    assert study.spec_hash not in listed.stdout
    fed.operator.cancel_study(study.study_id)


def test_a_rejection_fails_the_study_at_once_naming_the_site(fed):
    spec = breast_spec(SITES, rounds=1, name="rejected")
    study = fed.create_study(spec, approve=False)
    steward(fed, "beta", spec, verb="reject")
    info = wait_until(fed, study.study_id, lambda i: i.status is not StudyStatus.AWAITING_APPROVAL)
    assert info.status is StudyStatus.FAILED
    assert info.reason == f"not approved: the data steward of beta rejected spec {study.spec_hash[:12]}"
    assert info.rounds == []


def test_the_approval_deadline_fails_the_study_naming_the_sites_that_did_not_approve(fed):
    spec = breast_spec(SITES, rounds=1, name="too-slow")
    study = fed.operator.create_study(spec, approval_wait_s=4)
    steward(fed, "alpha", spec)
    info = wait_until(fed, study.study_id, lambda i: i.status is not StudyStatus.AWAITING_APPROVAL)
    assert info.status is StudyStatus.FAILED
    assert info.reason == "approval deadline passed: not approved by beta"


def test_a_study_whose_sites_approved_beforehand_starts_at_once(fed):
    spec = breast_spec(SITES, rounds=1, name="pre-approved")
    study = fed.create_study(spec)  # each steward approved the spec before it was submitted
    assert study.status is StudyStatus.RUNNING
    assert fed.wait_for_study(study.study_id, timeout=120).status is StudyStatus.COMPLETED


def test_an_awaiting_study_can_be_cancelled(fed):
    study = fed.create_study(breast_spec(SITES, rounds=1, name="cancelled"), approve=False)
    admin = ["--credential", fed.home.admin_credential, "--orchestrator", fed.url]
    result = cli("study", "cancel", study.study_id, *admin)
    assert result.exit_code == 0, result.output
    assert fed.study(study.study_id).status is StudyStatus.CANCELLED


def test_approve_refuses_a_hash_the_steward_has_not_shown(fed):
    spec = breast_spec(SITES, rounds=1, name="unread")
    study = fed.create_study(spec, approve=False)
    home = fed.site_home("alpha").root
    assert cli("site", "approvals", "--home", home).exit_code == 0  # the spec is now held at the site
    result = cli("site", "approve", study.spec_hash, "--reason", "looks fine", "--home", home)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: spec {study.spec_hash} has not been shown at this site")
    assert fed.study(study.study_id).approvals["alpha"] is ApprovalState.PENDING
    fed.operator.cancel_study(study.study_id)


def test_a_signed_spec_reaches_the_steward_verified(fed, tmp_path):
    spec_file = tmp_path / "study.toml"
    init = [
        *("study", "init", "--recipe", "logreg", "--dataset", "breast-cancer", "--site", "alpha"),
        *("--site", "beta", "--features", "30", "--name", "signed-one", "--out", spec_file),
    ]
    assert cli(*init).exit_code == 0
    digest = cli("study", "hash", spec_file).stdout.strip()
    admin = ["--credential", fed.home.admin_credential, "--orchestrator", fed.url]
    fed.owner_key()  # the admin's signing key, registered by the studies above: the one to sign with
    submitted = cli("study", "submit", spec_file, *admin, "--signing-key", fed.workdir / "owner.key")
    assert submitted.exit_code == 0, submitted.output
    study_id = submitted.stdout.strip()
    shown = cli("site", "approvals", "show", digest, "--home", fed.site_home("alpha").root, "--json")
    assert shown.exit_code == 0, shown.output
    assert '"signed": true' in shown.stdout
    assert fed.study(study_id).spec_hash == digest
    fed.operator.cancel_study(study_id)


def test_an_awaiting_study_survives_a_restart_and_its_deadline_still_holds(fed):
    waiting = fed.create_study(breast_spec(SITES, rounds=1, name="restart-wait"), approve=False)
    expiring = fed.operator.create_study(
        breast_spec(SITES, rounds=1, name="restart-expire"), approval_wait_s=3
    )
    fed.stop_orchestrator()
    time.sleep(3.5)  # the second study's deadline passes while the orchestrator is down
    fed.start_orchestrator()
    expired = wait_until(fed, expiring.study_id, lambda i: i.status is not StudyStatus.AWAITING_APPROVAL)
    assert expired.status is StudyStatus.FAILED
    assert expired.reason == "approval deadline passed: not approved by alpha, beta"
    assert fed.study(waiting.study_id).status is StudyStatus.AWAITING_APPROVAL
    spec = breast_spec(SITES, rounds=1, name="restart-wait")
    for site in SITES:
        steward(fed, site, spec)
    assert fed.wait_for_study(waiting.study_id, timeout=120).status is StudyStatus.COMPLETED
