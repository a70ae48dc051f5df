"""One contract for the orchestrator's store, run against SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fedhealth.core import ConflictError, NotFoundError
from fedhealth.orchestrator import ModelVersion, NewRound, Store, make_engine, sqlite_url, upgrade_database
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
