"""Attacks on the steward's approval and the owner's spec signature at the site's gate (docs/governance.md,
*Study approval*, *A task's way through the site's gate* steps 2, 4 and 6, *Spec signatures*): the real agent
with its real gates on a real site home, handed forged tasks by a lying orchestrator.

Lies played: an approval revoked by a rejection; a spec changed after approval in any field; the approved
spec sent beside other parameters (recipe, dataset, seed); an approval replayed for another study, spec
version, dataset or site; a task for a role the spec does not give this site (training at an
evaluation-only site, a site the spec does not name); a spec signature over another spec, by another owner,
or by a key that is not the one this site saw for that owner. Each refusal must come before the dataset is
opened: the dataset file does not exist, so a site that opened it would report ``dataset_unavailable``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from site_fixtures import SITE, absent_cohort, agent, approve, cohort, gate_study, make_home, task
from typer.testing import CliRunner

from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.cli import app
from fedhealth.core import NotFoundError
from fedhealth.crypto import IdentityKey
from fedhealth.governance import ApprovalStatus, AuditEventType, SignedSpec, read_stored_log, spec_hash
from fedhealth.protocol import FailureCode, StudySpec, TaskKind
from support import logreg_recipe


def signed(spec: StudySpec, key: IdentityKey, owner: str | None = None) -> dict[str, str]:
    s = SignedSpec.sign(spec.model_dump(mode="json"), owner=owner or spec.owner, key=key)
    return {"spec_signature": s.signature.hex(), "owner_public_key": s.owner_key.raw.hex()}


def codes(client) -> list[FailureCode]:
    return [f.code for f in client.failures]


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    return make_home(tmp_path / "site")


# --- the control: an approved spec with its own parameters runs ------------------------------------------


def test_control_the_approved_spec_runs(home, tmp_path):
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec))
    assert client.failures == []
    assert len(client.results) == 1


# --- approval revoked --------------------------------------------------------------------------------------


def test_a_revoked_approval_refuses_the_next_task_before_the_data_is_opened(home, tmp_path):
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, absent_cohort(tmp_path))
    with SiteGovernance(home) as governance:
        governance.reject(spec, reason="withdrawn by the IRB", steward="dana")
    site.handle(task(spec))
    assert codes(client) == [FailureCode.STUDY_APPROVAL]
    assert client.results == []


def test_a_revocation_between_two_rounds_stops_the_running_study(home, tmp_path):
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec, round=1, task_id="tk-1"))
    assert len(client.results) == 1  # control: round 1 ran
    with SiteGovernance(home) as governance:
        governance.reject(spec, reason="withdrawn by the IRB", steward="dana")
    site.handle(task(spec, round=2, task_id="tk-2"))
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=spec.rounds + 1, task_id="tk-3"))
    assert codes(client) == [FailureCode.STUDY_APPROVAL, FailureCode.STUDY_APPROVAL]
    assert len(client.results) == 1
    assert client.evaluations == []


# --- a spec changed after approval --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"recipe": logreg_recipe(2, learning_rate=5.0, local_epochs=1)},  # recipe parameters
        {"recipe": logreg_recipe(2, learning_rate=0.5, local_epochs=50)},  # more local passes over the data
        {"rounds": 200},
        {"seed": 8},
        {"purpose": "marketing"},  # the consent purpose
        {"min_sites": 2},
        {"train_sites": [SITE, "hospital-b", "hospital-c"]},
        {"train_sites": [SITE]},  # alone: the orchestrator would see this site's update as the model
        {"eval_sites": [SITE]},
        {"owner": "mallory"},
        {"description": "now with genomics"},
        {"round_deadline_s": 7 * 24 * 3600.0},
    ],
    ids=lambda c: "-".join(c),
)
def test_a_spec_changed_after_approval_in_any_field_is_refused(home, tmp_path, changes):
    approve(home, gate_study())
    changed = gate_study(**changes)
    site, client = agent(home, absent_cohort(tmp_path))
    site.handle(task(changed))
    assert codes(client) == [FailureCode.STUDY_APPROVAL]
    assert client.results == []
    with SiteGovernance(home) as governance:
        refusals = [
            e.payload["reason"]
            for e in read_stored_log(governance.engine).entries
            if e.type == AuditEventType.TASK_REFUSED
        ]
    assert any("changed after approval" in r for r in refusals)


# --- the approved spec sent beside other parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    "update",
    [
        {"recipe": logreg_recipe(2, learning_rate=5.0, local_epochs=1)},
        {"recipe": logreg_recipe(2, learning_rate=0.5, local_epochs=50)},
        {"dataset": "other-cohort"},
        {"seed": 8},
    ],
    ids=["learning-rate", "local-epochs", "dataset", "seed"],
)
def test_an_approved_spec_beside_other_task_parameters_is_refused(home, tmp_path, update):
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, {**absent_cohort(tmp_path), "other-cohort": absent_cohort(tmp_path)["cohort"]})
    site.handle(task(spec).model_copy(update=update))
    assert codes(client) == [FailureCode.SPEC_MISMATCH]
    assert client.results == []


# --- an approval replayed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{"name": "another-study"}, {"dataset": "cohort-2"}, {"recipe": logreg_recipe(2, learning_rate=0.25)}],
    ids=["another-study", "another-dataset", "another-version"],
)
def test_an_approval_does_not_cover_another_study_dataset_or_version(home, tmp_path, changes):
    approve(home, gate_study())
    other = gate_study(**changes)
    site, client = agent(
        home, {"cohort": absent_cohort(tmp_path)["cohort"], "cohort-2": absent_cohort(tmp_path)["cohort"]}
    )
    site.handle(task(other))
    assert codes(client) == [FailureCode.STUDY_APPROVAL]


def test_an_approval_at_one_site_does_not_admit_the_task_at_another(tmp_path):
    spec = gate_study()
    approving = make_home(tmp_path / "a")
    approve(approving, spec)
    other = make_home(tmp_path / "b", site="hospital-b")
    site, client = agent(other, absent_cohort(tmp_path))
    site.handle(task(spec))
    assert codes(client) == [FailureCode.STUDY_APPROVAL]


def test_an_orchestrator_cannot_register_an_approved_hash_for_another_spec(home):
    """``GET /agent/approvals`` hands the site {spec_hash, spec}: a pending spec claiming the approved hash
    with another body is not taken as approved."""
    from fedhealth.agent._approvals import register_pending
    from fedhealth.core import InputError
    from fedhealth.protocol import PendingSpec

    approved = gate_study()
    approve(home, approved)
    changed = gate_study(rounds=50)
    pending = PendingSpec(
        study_id="st-1", spec_hash=spec_hash(approved.model_dump(mode="json")), spec=changed
    )
    with SiteGovernance(home) as governance:
        with pytest.raises(InputError):
            register_pending(governance, pending)
        record = governance.approvals.get(spec_hash(changed.model_dump(mode="json")))
        assert record.status is ApprovalStatus.PENDING
        assert governance.approvals.check(changed.model_dump(mode="json")).allowed is False


# --- a task for a role the spec does not give this site -----------------------------------------------------


ROLE_LIES = [
    pytest.param(
        {"train_sites": ["hospital-b"], "eval_sites": [SITE, "hospital-b"]},
        TaskKind.TRAIN,
        1,
        id="training-at-an-evaluation-only-site",
    ),
    pytest.param({"train_sites": ["hospital-b"]}, TaskKind.TRAIN, 1, id="training-at-a-site-not-named"),
    pytest.param({"train_sites": ["hospital-b"]}, TaskKind.EVALUATE, 3, id="evaluation-at-a-site-not-named"),
    pytest.param(
        {"train_sites": [SITE, "hospital-b"], "eval_sites": ["hospital-b"]},
        TaskKind.EVALUATE,
        3,
        id="evaluation-at-a-training-only-site",
    ),
]


@pytest.mark.parametrize(("roles", "kind", "round_number"), ROLE_LIES)
def test_a_task_for_a_role_the_spec_does_not_give_this_site_is_refused(
    home, tmp_path, roles, kind, round_number
):
    spec = gate_study(**roles)
    approve(home, spec)  # the steward approved this spec, reading "This site evaluates" / "takes no part"
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec, kind=kind, round=round_number))
    assert len(client.failures) == 1
    assert client.failures[0].code in (FailureCode.SPEC_MISMATCH, FailureCode.STUDY_APPROVAL)
    assert client.results == []
    assert client.evaluations == []


# --- spec signatures ----------------------------------------------------------------------------------------


def test_control_a_spec_signed_by_its_owner_runs_and_is_recorded_signed(home, tmp_path):
    alice = IdentityKey.generate()
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec, **signed(spec, alice)))
    assert client.failures == []


@pytest.mark.parametrize(
    "forge",
    [
        "over-another-spec",
        "signed-as-another-owner",
        "signature-without-key",
        "key-without-signature",
        "garbage",
    ],
)
def test_a_forged_spec_signature_is_refused_before_the_data_is_opened(home, tmp_path, forge):
    alice = IdentityKey.generate()
    spec = gate_study()
    approve(home, spec)
    fields = signed(spec, alice)
    if forge == "over-another-spec":
        fields = signed(gate_study(rounds=50), alice)
    elif forge == "signed-as-another-owner":
        fields = signed(spec.model_copy(update={"owner": "mallory"}), alice, owner="mallory")
    elif forge == "signature-without-key":
        fields = {"spec_signature": fields["spec_signature"]}
    elif forge == "key-without-signature":
        fields = {"owner_public_key": fields["owner_public_key"]}
    else:
        fields = {**fields, "spec_signature": "zz" * 64}
    site, client = agent(home, absent_cohort(tmp_path))
    site.handle(task(spec, **fields))
    assert codes(client) == [FailureCode.SPEC_SIGNATURE]


def test_a_spec_signed_by_a_key_other_than_the_owners_known_key_is_refused(home, tmp_path):
    alice, orchestrators_own = IdentityKey.generate(), IdentityKey.generate()
    first = gate_study()
    approve(home, first)
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(first, task_id="tk-1", **signed(first, alice)))
    assert client.failures == []  # the site has now seen alice's key

    # a new spec "by alice" that alice never signed: the orchestrator signs it with its own key
    forged = gate_study(name="gate-study-2", rounds=1)
    site.handle(task(forged, task_id="tk-2", **signed(forged, orchestrators_own)))
    assert codes(client) == [FailureCode.SPEC_SIGNATURE]
    with SiteGovernance(home) as governance:  # never put before the steward as alice's
        with pytest.raises(NotFoundError):
            governance.approvals.get(spec_hash(forged.model_dump(mode="json")))
        pinned = governance.approvals.owner_key("alice")
    assert pinned == alice.public()


def test_after_the_steward_trusts_an_owners_new_key_only_that_key_signs_their_specs(home, tmp_path):
    old, new = IdentityKey.generate(), IdentityKey.generate()
    first, second, third = gate_study(), gate_study(name="gate-study-2"), gate_study(name="gate-study-3")
    for spec in (first, second, third):
        approve(home, spec)
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(first, task_id="tk-1", **signed(first, old)))
    site.handle(task(second, task_id="tk-2", **signed(second, new)))
    assert codes(client) == [FailureCode.SPEC_SIGNATURE]  # alice's key changed: not trusted yet
    cli = CliRunner().invoke(
        app,
        [
            "site", "approvals", "trust-key", "alice", new.public().raw.hex(),
            "--reason", "alice's new key, read to me on the phone",
            "--home", str(home.root), "--steward", "sam",
        ],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert f"was {old.public().fingerprint[:16]}" in cli.output
    site.handle(task(second, task_id="tk-3", **signed(second, new)))
    site.handle(task(third, task_id="tk-4", **signed(third, old)))  # the old key no longer signs for alice
    assert codes(client) == [FailureCode.SPEC_SIGNATURE, FailureCode.SPEC_SIGNATURE]
    assert len(client.results) == 2  # tk-1 and tk-3
    with SiteGovernance(home) as governance:
        entries = read_stored_log(governance.engine).entries
    [pin] = [
        e for e in entries if e.type is AuditEventType.OWNER_KEY_PINNED and e.payload["by"] != "first use"
    ]
    assert pin.payload["by"] == "steward:sam"
    assert pin.payload["fingerprint"] == new.public().fingerprint
    assert pin.payload["previous_fingerprint"] == old.public().fingerprint


def test_trusting_a_malformed_owner_key_is_one_line(home):
    cli = CliRunner().invoke(
        app, ["site", "approvals", "trust-key", "alice", "zz", "--reason", "r", "--home", str(home.root)]
    )
    assert cli.exit_code != 0
    assert "64 hex characters" in cli.output


def test_an_approved_spec_cannot_be_run_as_a_different_task_kind_round(home, tmp_path):
    """A training round beyond the spec's, and an evaluation outside the evaluation round, are refused."""
    spec = gate_study()
    approve(home, spec)
    site, client = agent(home, absent_cohort(tmp_path))
    site.handle(task(spec, round=spec.rounds + 1, task_id="tk-1"))
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=1, task_id="tk-2"))
    site.handle(task(spec, kind=TaskKind.COLLECTIVE, round=1, task_id="tk-3"))
    assert codes(client)[:2] == [FailureCode.SPEC_MISMATCH, FailureCode.SPEC_MISMATCH]
    assert len(codes(client)) == 3
    assert codes(client)[2] != FailureCode.DATASET_UNAVAILABLE  # refused before the data
    assert client.results == []
