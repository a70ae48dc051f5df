"""One contract for the orchestrator's store, run against SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fedhealth.core import ConflictError, InputError, NotFoundError
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator import ModelVersion, NewRound, Store, make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._db import enrollment_tokens
from fedhealth.orchestrator._store import EnrollOutcome, SiteStatus
from fedhealth.protocol import (
    ApprovalState,
    RoundStatus,
    SiteAttestation,
    SiteMetrics,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from support import breast_spec, postgres_schema

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(sqlite_url(tmp_path / "o.sqlite"))
        upgrade_database(engine)
        yield Store(engine)
        engine.dispose()
    else:
        with postgres_schema() as url:
            engine = make_engine(url)
            upgrade_database(engine)
            yield Store(engine)
            engine.dispose()


def _study(store: Store, sites=("a", "b", "c")):
    for s in sites:
        store.create_site(s, T0)
    spec = breast_spec(list(sites), rounds=2, min_sites=2)
    first = NewRound(
        number=1,
        kind=TaskKind.TRAIN,
        sites=list(sites),
        model_in_digest=DIGEST_A,
        deadline_at=T0 + timedelta(seconds=30),
    )
    return store.create_study(spec=spec, model_digest=DIGEST_A, state_digest=None, first=first, when=T0)


def test_sites_are_unique_and_listed_in_order(store):
    store.create_site("beta", T0)
    store.create_site("alpha", T0)
    with pytest.raises(ConflictError, match="already exists"):
        store.create_site("alpha", T0)
    assert [s.name for s in store.list_sites()] == ["alpha", "beta"]
    with pytest.raises(NotFoundError):
        store.get_site("gamma")


def test_creating_a_study_opens_round_one_with_a_pending_task_per_site(store):
    study, first = _study(store)
    assert study.status is StudyStatus.RUNNING
    assert study.spec.min_sites == 2
    assert first.number == 1
    assert first.status is RoundStatus.OPEN
    assert first.deadline_at == T0 + timedelta(seconds=30)
    tasks = store.tasks_of_round(first.id)
    assert [t.site for t in tasks] == ["a", "b", "c"]
    assert all(t.status is TaskStatus.PENDING for t in tasks)


def test_a_study_over_unknown_sites_is_refused_and_nothing_is_written(store):
    store.create_site("a", T0)
    spec = breast_spec(["a", "zz"], rounds=1)
    first = NewRound(
        number=1, kind=TaskKind.TRAIN, sites=["a", "zz"], model_in_digest=DIGEST_A, deadline_at=T0
    )
    with pytest.raises(NotFoundError, match="zz"):
        store.create_study(spec=spec, model_digest=DIGEST_A, state_digest=None, first=first, when=T0)
    assert store.list_studies() == []
    assert store.open_rounds() == []


def test_next_task_is_delivered_and_closes_exactly_once(store):
    _, first = _study(store)
    task, round_row = store.next_task("b")
    assert round_row.id == first.id
    assert task.site == "b"
    store.mark_delivered(task.id, T0)
    assert store.get_task(task.id).status is TaskStatus.DELIVERED
    # a restarted agent gets the same task again until it is closed
    assert store.next_task("b")[0].id == task.id
    metrics = SiteMetrics(num_samples=10, train_loss=0.5)
    assert store.complete_task(task.id, digest=DIGEST_B, num_samples=10, metrics=metrics, when=T0)
    assert not store.complete_task(task.id, digest=DIGEST_A, num_samples=10, metrics=metrics, when=T0)
    assert not store.close_task(task.id, TaskStatus.REJECTED, "late", T0)
    stored = store.get_task(task.id)
    assert stored.status is TaskStatus.COMPLETED
    assert stored.result_digest == DIGEST_B
    assert stored.metrics == metrics
    assert store.next_task("b") is None


def test_a_sites_open_tasks_are_those_pending_or_delivered_in_open_rounds_oldest_first(store):
    # what revoking a site closes (docs/security.md, Sites item 4)
    _, first = _study(store)
    spec = breast_spec(["a", "b"], rounds=1, min_sites=1)
    later = NewRound(
        number=1, kind=TaskKind.TRAIN, sites=["a", "b"], model_in_digest=DIGEST_A, deadline_at=T0
    )
    other, second = store.create_study(
        spec=spec, model_digest=DIGEST_A, state_digest=None, first=later, when=T0 + timedelta(seconds=1)
    )
    b_first, b_second = (
        next(t for t in store.tasks_of_round(r.id) if t.site == "b") for r in (first, second)
    )
    assert [t.id for t in store.open_tasks_of_site("b")] == [b_first.id, b_second.id]
    store.mark_delivered(b_first.id, T0)  # delivered is still open
    assert [t.id for t in store.open_tasks_of_site("b")] == [b_first.id, b_second.id]
    assert store.close_task(b_first.id, TaskStatus.FAILED, "site said no", T0)
    assert [t.id for t in store.open_tasks_of_site("b")] == [b_second.id]
    assert store.end_study(other.id, StudyStatus.CANCELLED, "operator", T0)  # its round is no longer open
    assert store.open_tasks_of_site("b") == []
    assert [t.site for t in store.open_tasks_of_site("c")] == ["c"]
    assert store.open_tasks_of_site("nobody") == []


def test_closing_several_tasks_at_once_closes_each_open_one_exactly_once(store):
    _, first = _study(store)
    a, b, c = store.tasks_of_round(first.id)
    store.close_task(c.id, TaskStatus.FAILED, "site said no", T0)  # already closed: left as it is
    attested = SiteAttestation(dataset_fingerprint="f" * 64)
    outcomes = {
        a.id: (TaskStatus.COMPLETED, None, attested),
        b.id: (TaskStatus.TIMED_OUT, "dropped out of secure aggregation at the share_keys stage", None),
        c.id: (TaskStatus.COMPLETED, None, attested),
    }
    assert store.close_tasks(outcomes, T0) == [a.id, b.id]
    assert store.close_tasks(outcomes, T0) == []
    by_id = {t.id: t for t in store.tasks_of_round(first.id)}
    assert by_id[a.id].status is TaskStatus.COMPLETED
    assert by_id[a.id].result_digest is None
    assert by_id[a.id].attestation == attested
    assert by_id[b.id].attestation is None
    assert by_id[b.id].status is TaskStatus.TIMED_OUT
    assert by_id[b.id].reason == "dropped out of secure aggregation at the share_keys stage"
    assert by_id[c.id].status is TaskStatus.FAILED
    assert by_id[c.id].reason == "site said no"
    assert store.count_open_tasks(first.id) == 0


def test_finishing_a_round_times_out_open_tasks_records_the_version_and_opens_the_next(store):
    study, first = _study(store)
    a, b, _ = store.tasks_of_round(first.id)
    m = SiteMetrics(num_samples=5)
    store.complete_task(a.id, digest=DIGEST_B, num_samples=5, metrics=m, when=T0)
    store.close_task(b.id, TaskStatus.REJECTED, "NaN", T0)
    nxt = NewRound(
        number=2, kind=TaskKind.TRAIN, sites=["a", "b", "c"], model_in_digest=DIGEST_B, deadline_at=T0
    )
    version = ModelVersion(
        digest=DIGEST_B,
        study_id=study.id,
        round=1,
        parent_digest=DIGEST_A,
        created_at=T0,
        num_sites=1,
        train_loss=0.3,
    )
    second = store.finish_round(
        first.id,
        status=RoundStatus.COMPLETED,
        reason=None,
        when=T0,
        metrics={"sites": 1},
        model_out=DIGEST_B,
        state_out=None,
        version=version,
        next_round=nxt,
    )
    assert second is not None
    assert second.number == 2
    assert second.model_in_digest == DIGEST_B
    statuses = {t.site: t.status for t in store.tasks_of_round(first.id)}
    assert statuses == {"a": TaskStatus.COMPLETED, "b": TaskStatus.REJECTED, "c": TaskStatus.TIMED_OUT}
    after = store.get_study(study.id)
    assert after.completed_rounds == 1
    assert after.model_digest == DIGEST_B
    assert [v.digest for v in store.model_versions_of(study.id)] == [DIGEST_B]
    assert store.get_round(first.id).metrics == {"sites": 1}
    with pytest.raises(ConflictError):
        store.finish_round(first.id, status=RoundStatus.FAILED, reason="x", when=T0)


def test_failing_a_round_fails_the_study_with_its_reason(store):
    study, first = _study(store)
    store.finish_round(
        first.id,
        status=RoundStatus.FAILED,
        reason="quorum not met",
        when=T0,
        study_status=StudyStatus.FAILED,
        study_reason="round 1: quorum not met",
    )
    after = store.get_study(study.id)
    assert after.status is StudyStatus.FAILED
    assert after.reason == "round 1: quorum not met"
    assert after.ended_at == T0
    assert store.open_rounds() == []


def test_cancelling_closes_the_open_round_and_its_tasks(store):
    study, first = _study(store)
    assert store.end_study(study.id, StudyStatus.CANCELLED, "operator", T0)
    assert not store.end_study(study.id, StudyStatus.CANCELLED, "again", T0)
    assert store.get_round(first.id).status is RoundStatus.FAILED
    assert all(t.status is TaskStatus.FAILED for t in store.tasks_of_round(first.id))
    assert store.next_task("a") is None


def test_migrations_are_idempotent(store):
    upgrade_database(store.engine)
    _study(store)
    upgrade_database(store.engine)
    assert len(store.list_studies()) == 1


# --- studies awaiting their sites' approvals ----------------------------------------------------------------


def _awaiting(store: Store, sites=("a", "b")):
    for s in sites:
        store.create_site(s, T0)
    spec = breast_spec(list(sites), rounds=1)
    study, first = store.create_study(
        spec=spec,
        model_digest=DIGEST_A,
        state_digest=None,
        first=None,
        when=T0,
        spec_hash=DIGEST_B,
        approval_deadline_at=T0 + timedelta(hours=1),
    )
    assert first is None
    return study


def test_a_study_without_a_first_round_awaits_approval_and_holds_no_round(store):
    study = _awaiting(store)
    assert study.status is StudyStatus.AWAITING_APPROVAL
    assert study.approval_deadline_at == T0 + timedelta(hours=1)
    assert study.spec_hash == DIGEST_B
    assert store.rounds_of(study.id) == []
    assert [s.id for s in store.awaiting_studies(DIGEST_B)] == [study.id]
    assert store.awaiting_studies(DIGEST_A) == []


def test_each_sites_latest_decision_on_a_hash_counts_and_unreported_sites_are_pending(store):
    _awaiting(store, sites=("a", "b", "c"))
    store.record_approval("a", DIGEST_B, ApprovalState.APPROVED, T0)
    store.record_approval("b", DIGEST_B, ApprovalState.APPROVED, T0)
    store.record_approval("b", DIGEST_B, ApprovalState.REJECTED, T0 + timedelta(seconds=1))  # revoked
    store.record_approval("c", DIGEST_A, ApprovalState.APPROVED, T0)  # another spec
    assert store.approvals_of(DIGEST_B, ["a", "b", "c"]) == {
        "a": ApprovalState.APPROVED,
        "b": ApprovalState.REJECTED,
        "c": ApprovalState.PENDING,
    }


def test_starting_an_awaiting_study_opens_round_one_once(store):
    study = _awaiting(store)
    first = NewRound(
        number=1, kind=TaskKind.TRAIN, sites=["a", "b"], model_in_digest=DIGEST_A, deadline_at=T0
    )
    opened = store.start_study(study.id, first, T0)
    assert opened is not None
    assert [t.site for t in store.tasks_of_round(opened.id)] == ["a", "b"]
    assert store.get_study(study.id).status is StudyStatus.RUNNING
    assert store.start_study(study.id, first, T0) is None  # started already: nothing more opens
    assert len(store.rounds_of(study.id)) == 1


def test_ending_only_an_awaiting_study_leaves_a_running_one_alone(store):
    waiting = _awaiting(store)
    running, _ = _study(store, sites=("x", "y"))
    assert not store.end_study(
        running.id, StudyStatus.FAILED, "x", T0, only_from=StudyStatus.AWAITING_APPROVAL
    )
    assert store.get_study(running.id).status is StudyStatus.RUNNING
    assert store.end_study(
        waiting.id, StudyStatus.FAILED, "deadline", T0, only_from=StudyStatus.AWAITING_APPROVAL
    )
    assert store.get_study(waiting.id).status is StudyStatus.FAILED
    assert (
        store.start_study(
            waiting.id,
            NewRound(number=1, kind=TaskKind.TRAIN, sites=["a"], model_in_digest=DIGEST_A, deadline_at=T0),
            T0,
        )
        is None
    )


def test_the_migration_fills_in_the_spec_hash_of_studies_stored_before_it(tmp_path):
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    from fedhealth.governance import spec_hash

    engine = make_engine(sqlite_url(tmp_path / "old.sqlite"))
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(Path(upgrade_database.__code__.co_filename).with_name("migrations"))
    )
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0004")
    old = Store(engine)
    for s in ("a", "b"):
        with engine.begin() as c:
            c.exec_driver_sql(
                f"INSERT INTO sites (name, created_at, status) VALUES ('{s}', '2026-01-01', 'active')"
            )
    spec = breast_spec(["a", "b"], rounds=1)
    with engine.begin() as c:
        c.exec_driver_sql(
            "INSERT INTO studies (id, name, spec_json, status, created_at, completed_rounds, model_digest) "
            "VALUES ('st_old', 'breast', ?, 'running', '2026-01-01', 0, ?)",
            (spec.model_dump_json(), DIGEST_A),
        )
    upgrade_database(engine)
    assert old.get_study("st_old").spec_hash == spec_hash(spec.model_dump(mode="json"))
    engine.dispose()


# --- identity: enrollment tokens, enrollment, rotation, revocation (threat-model finding 9) ---------------

LATER = T0 + timedelta(hours=24)


def test_issuing_an_enrollment_token_cancels_the_sites_earlier_ones(store):
    store.create_site("a", T0)
    assert store.add_enrollment_token("a", "h1", T0, LATER) == 0
    assert store.add_enrollment_token("a", "h2", T0, LATER) == 1
    assert (
        store.enroll_site(site="a", token_hash="h1", public_key="k" * 64, when=T0)
        is EnrollOutcome.INVALID_TOKEN
    )
    assert store.get_site("a").status is SiteStatus.PENDING
    assert (
        store.enroll_site(site="a", token_hash="h2", public_key="k" * 64, when=T0) is EnrollOutcome.ENROLLED
    )


@pytest.mark.parametrize("case", ["expired", "other site", "spent", "unknown site"])
def test_an_enrollment_with_a_token_that_is_not_the_sites_valid_one_changes_nothing(store, case):
    store.create_site("a", T0)
    store.create_site("b", T0)
    store.add_enrollment_token("a", "ha", T0, LATER)
    store.add_enrollment_token("b", "hb", T0, LATER)
    site, token, when = {
        "expired": ("a", "ha", LATER + timedelta(seconds=1)),
        "other site": ("a", "hb", T0),
        "spent": ("a", "ha", T0),
        "unknown site": ("zz", "ha", T0),
    }[case]
    if case == "spent":
        assert (
            store.enroll_site(site="a", token_hash="ha", public_key="1" * 64, when=T0)
            is EnrollOutcome.ENROLLED
        )
        assert store.enroll_site(site=site, token_hash=token, public_key="2" * 64, when=when) is (
            EnrollOutcome.INVALID_TOKEN
        )
        assert store.get_site("a").public_key == "1" * 64
        return
    assert store.enroll_site(site=site, token_hash=token, public_key="2" * 64, when=when) is (
        EnrollOutcome.INVALID_TOKEN
    )
    assert store.get_site("a").status is SiteStatus.PENDING
    assert store.get_site("b").status is SiteStatus.PENDING


def test_an_enrolled_site_gets_no_token_and_is_never_enrolled_over(store, tmp_path):
    store.create_site("a", T0)
    store.add_enrollment_token("a", "h1", T0, LATER)
    store.enroll_site(site="a", token_hash="h1", public_key="1" * 64, when=T0, cert_fingerprint="c" * 64)
    with pytest.raises(ConflictError, match="rotate"):
        store.add_enrollment_token("a", "h2", T0, LATER)
    # a valid token that exists anyway (written by an older version) does not overwrite the key
    with store.engine.begin() as c:
        c.execute(
            sa.insert(enrollment_tokens).values(
                token_hash="h3", site="a", created_at=T0, expires_at=LATER, used_at=None
            )
        )
    outcome = store.enroll_site(site="a", token_hash="h3", public_key="2" * 64, when=T0)
    assert outcome is EnrollOutcome.ALREADY_ENROLLED
    site = store.get_site("a")
    assert (site.public_key, site.cert_fingerprint) == ("1" * 64, "c" * 64)


def test_rotation_retires_the_key_and_certificate_and_issues_the_one_token_for_the_new_key(store):
    store.create_site("a", T0)
    store.add_enrollment_token("a", "h1", T0, LATER)
    store.enroll_site(site="a", token_hash="h1", public_key="1" * 64, when=T0, cert_fingerprint="c" * 64)
    store.add_challenge("a", "ch", T0, LATER)
    before = store.rotate_site("a", "h2", T0, LATER)
    assert (before.public_key, before.cert_fingerprint) == ("1" * 64, "c" * 64)
    after = store.get_site("a")
    assert after.status is SiteStatus.PENDING
    assert (after.public_key, after.cert_fingerprint, after.enrolled_at) == (None, None, None)
    assert not store.use_challenge(site="a", challenge="ch", when=T0)  # outstanding challenges cancelled
    with pytest.raises(ConflictError, match="pending"):
        store.rotate_site("a", "h3", T0, LATER)
    assert (
        store.enroll_site(site="a", token_hash="h2", public_key="2" * 64, when=T0) is EnrollOutcome.ENROLLED
    )
    assert store.get_site("a").public_key == "2" * 64
    with pytest.raises(NotFoundError):
        store.rotate_site("zz", "h4", T0, LATER)


def test_revoking_a_site_cancels_its_tokens_and_nothing_revives_it(store):
    store.create_site("a", T0)
    store.add_enrollment_token("a", "h1", T0, LATER)
    assert store.revoke_site("a", T0)
    assert not store.revoke_site("a", T0)
    assert (
        store.enroll_site(site="a", token_hash="h1", public_key="1" * 64, when=T0)
        is EnrollOutcome.INVALID_TOKEN
    )
    with pytest.raises(ConflictError, match="revoked"):
        store.add_enrollment_token("a", "h2", T0, LATER)
    with pytest.raises(ConflictError, match="revoked"):
        store.rotate_site("a", "h3", T0, LATER)
    assert store.get_site("a").status is SiteStatus.REVOKED


def test_sites_and_users_share_one_namespace_of_names(store):
    store.create_site("north", T0)
    store.create_user("rita", "researcher", "x" * 64, T0)
    with pytest.raises(ConflictError, match="user's name"):
        store.create_site("rita", T0)
    with pytest.raises(ConflictError, match="site's name"):
        store.create_user("north", "auditor", "y" * 64, T0)
    with pytest.raises(ConflictError, match="already exists"):
        store.create_user("rita", "auditor", "y" * 64, T0)


def test_a_users_api_key_is_replaced_unless_the_user_is_revoked(store):
    store.create_user("rita", "researcher", "x" * 64, T0)
    assert store.set_user_api_key("rita", "y" * 64)
    assert store.get_user("rita").api_key_hash == "y" * 64
    assert not store.set_user_api_key("nobody", "z" * 64)
    store.revoke_user("rita", T0)
    assert not store.set_user_api_key("rita", "z" * 64)
    assert store.get_user("rita").api_key_hash == "y" * 64


def test_an_identity_change_and_its_audit_entry_commit_together_or_not_at_all(store):
    log = AuditLog(store.engine, IdentityKey.generate(), "orchestrator")

    def crash_before_the_commit() -> None:
        with log.transaction() as c:
            store.create_site("a", T0, connection=c)
            store.add_enrollment_token("a", "h1", T0, LATER, connection=c)
            log.append(AuditEventType.SITE_CREATED, {"site": "a", "by": "admin"}, connection=c)
            raise RuntimeError("crash before the commit")

    with pytest.raises(RuntimeError, match="crash"):
        crash_before_the_commit()
    assert store.get_site_or_none("a") is None
    assert log.entries() == []
    with log.transaction() as c:
        store.create_site("a", T0, connection=c)
        log.append(AuditEventType.SITE_CREATED, {"site": "a", "by": "admin"}, connection=c)
    assert store.get_site("a").status is SiteStatus.PENDING
    assert [e.type for e in log.entries()] == [AuditEventType.SITE_CREATED]


# --- what may be read, and who takes part (threat-model findings 10 and 14) -------------------------------


def test_a_site_may_read_only_the_input_model_of_its_own_open_tasks(store):
    _, first = _study(store, sites=("a", "b"))
    store.create_site("c", T0)
    assert store.site_may_read_model("a", DIGEST_A)
    assert not store.site_may_read_model("c", DIGEST_A)  # no task
    assert not store.site_may_read_model("a", DIGEST_B)  # not its task's model
    task_a = next(t for t in store.tasks_of_round(first.id) if t.site == "a")
    store.complete_task(
        task_a.id, digest=DIGEST_B, num_samples=1, metrics=SiteMetrics(num_samples=1), when=T0
    )
    assert not store.site_may_read_model("a", DIGEST_A)  # its task is closed
    assert not store.site_may_read_model("a", DIGEST_B)  # its own upload
    assert store.site_may_read_model("b", DIGEST_A)


def test_only_released_versions_are_model_versions(store):
    study, first = _study(store)
    assert store.model_version(DIGEST_A) is None  # the initial model
    version = ModelVersion(
        digest=DIGEST_B,
        study_id=study.id,
        round=1,
        parent_digest=DIGEST_A,
        created_at=T0,
        num_sites=2,
        train_loss=None,
    )
    store.finish_round(
        first.id, status=RoundStatus.COMPLETED, reason=None, when=T0, model_out=DIGEST_B, version=version
    )
    found = store.model_version(DIGEST_B)
    assert found is not None
    assert (found.study_id, found.round, found.created_at) == (study.id, 1, T0)


@pytest.mark.parametrize(
    ("eval_sites", "error", "needle"),
    [(["r"], InputError, "revoked sites cannot take part in a study: r"), (["zz"], NotFoundError, "zz")],
)
def test_a_study_naming_a_revoked_or_unknown_evaluation_site_is_refused(store, eval_sites, error, needle):
    for s in ("a", "r"):
        store.create_site(s, T0)
    store.revoke_site("r", T0)
    spec = breast_spec(["a"], rounds=1, eval_sites=eval_sites)
    first = NewRound(number=1, kind=TaskKind.TRAIN, sites=["a"], model_in_digest=DIGEST_A, deadline_at=T0)
    with pytest.raises(error, match=needle):
        store.create_study(spec=spec, model_digest=DIGEST_A, state_digest=None, first=first, when=T0)
    assert store.list_studies() == []


def test_a_sites_credentials_follow_enrollment_rotation_and_revocation_at_once(store):
    # what every authenticated request reads (through the driver's cursor, not the ORM)
    assert store.site_credentials("a") is None
    store.create_site("a", T0)
    assert store.site_credentials("a").status is SiteStatus.PENDING
    store.add_enrollment_token("a", "h1", T0, LATER)
    store.enroll_site(site="a", token_hash="h1", public_key="1" * 64, when=T0, cert_fingerprint="c" * 64)
    enrolled = store.site_credentials("a")
    assert (enrolled.status, enrolled.public_key, enrolled.cert_fingerprint) == (
        SiteStatus.ACTIVE,
        "1" * 64,
        "c" * 64,
    )
    store.rotate_site("a", "h2", T0, LATER)
    assert store.site_credentials("a").public_key is None
    store.revoke_site("a", T0)
    assert store.site_credentials("a").status is SiteStatus.REVOKED


def test_a_study_view_reads_what_the_separate_queries_read(store):
    running, _ = _study(store)
    awaiting = _awaiting(store, sites=("d", "e"))
    store.record_approval("d", DIGEST_B, ApprovalState.APPROVED, T0)
    for study in (running, awaiting):
        row, rounds, tasks, approvals = store.study_view(study.id)
        assert row == store.get_study(study.id)
        assert rounds == store.rounds_of(study.id)
        assert tasks == store.tasks_of_study(study.id)
        expected = store.approvals_of(row.spec_hash, row.named_sites) if row.spec_hash else {}
        assert approvals == expected
    assert store.study_view(awaiting.id)[3] == {"d": ApprovalState.APPROVED, "e": ApprovalState.PENDING}
    assert store.study_view(running.id, with_rounds=False)[1:3] == ([], [])
    with pytest.raises(NotFoundError):
        store.study_view("st_missing")


def test_a_revoked_token_is_known_until_it_would_have_expired_and_then_forgotten(store):
    store.create_user("ana", "researcher", "0" * 64, T0)
    assert store.user_for_token("ana", "tok-1") == (store.get_user("ana"), False)
    store.revoke_token("tok-1", T0 + timedelta(minutes=15), T0)
    store.revoke_token("tok-1", T0 + timedelta(minutes=15), T0)  # twice: still one revocation
    user, revoked = store.user_for_token("ana", "tok-1")
    assert user is not None
    assert user.name == "ana"
    assert revoked
    assert store.user_for_token("ana", "tok-2")[1] is False  # another token of the same user
    assert store.user_for_token("nobody", "tok-1") == (None, False)
    # a later revocation, after tok-1 expired, forgets tok-1 (it is refused by its expiry from then on)
    store.revoke_token("tok-3", T0 + timedelta(minutes=40), T0 + timedelta(minutes=20))
    assert store.user_for_token("ana", "tok-1")[1] is False
    assert store.user_for_token("ana", "tok-3")[1] is True


def test_figures_stored_before_a_check_was_added_are_read_without_them(store, caplog):
    """Receipt now refuses a loss of 1e200 and an attestation fingerprint that is no digest; a database
    written before (by an attacked site) still holds such rows. Each is read without those figures, with
    a warning, and the round's other tasks and the study stay readable: before, every read of the round
    (its report, the round engine's aggregation) raised a ValidationError."""
    _, first = _study(store)
    honest, hostile = store.tasks_of_round(first.id)[:2]
    good = SiteMetrics(num_samples=10, train_loss=0.5)
    attested = SiteAttestation(consent_snapshot="c" * 64)
    for task in (honest, hostile):
        store.complete_task(
            task.id, digest=DIGEST_B, num_samples=10, metrics=good, when=T0, attestation=attested
        )
    with store.engine.begin() as c:  # as an older version stored them
        c.execute(
            sa.text("UPDATE tasks SET metrics_json = :m, attestation_json = :a WHERE id = :id"),
            {
                "m": '{"num_samples": 10, "train_loss": 1e200}',
                "a": '{"consent_snapshot": "not a digest <script>"}',
                "id": hostile.id,
            },
        )
    with caplog.at_level("WARNING", logger="fedhealth.orchestrator"):
        read = {t.id: t for t in store.tasks_of_round(first.id)}
    assert read[hostile.id].metrics is None
    assert read[hostile.id].attestation is None
    assert read[hostile.id].status is TaskStatus.COMPLETED
    assert read[hostile.id].num_samples == 10
    assert read[honest.id].metrics == good
    assert read[honest.id].attestation == attested
    warned = [r.getMessage() for r in caplog.records if hostile.id in r.getMessage()]
    assert len(warned) == 2
    assert not any("1e200" in line or "script" in line for line in warned)  # no stored value in the log
