"""The round engine as the driver of ``RoundState`` (issue 11, item 2), in one process: the real engine, store
(SQLite) and blob store, results written as the upload route writes them, no HTTP. What the rules decide
reaches the database; a decision the database refuses to record fails the study instead of leaving its
round open; a round whose tasks all closed while the orchestrator was down closes when it comes back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fedhealth.orchestrator import Store
from fedhealth.protocol import RoundStatus, StudyStatus, TaskKind, TaskStatus
from support import ENGINE_SITES, RoundEngineHarness, run_round_engine

SITES = ENGINE_SITES


def test_a_study_runs_through_the_rules_to_its_end_with_a_failed_site_counted_out(tmp_path):
    async def test(o: RoundEngineHarness) -> None:
        study_id = await o.start()
        for _ in range(2):  # two training rounds: two results and one failure each
            await o.engine.task_closed(*o.complete(study_id, "north"))
            await o.engine.task_closed(*o.fail(study_id, "east", "budget_exhausted: no epsilon left"))
            assert o.open_round(study_id).kind is TaskKind.TRAIN  # one task still open
            await o.engine.task_closed(*o.complete(study_id, "south"))
        evaluation = o.open_round(study_id)
        assert (evaluation.number, evaluation.kind) == (3, TaskKind.EVALUATE)
        for site in SITES:
            await o.engine.task_closed(*o.complete(study_id, site))
        study = o.store.get_study(study_id)
        assert study.status is StudyStatus.COMPLETED, study.reason
        assert study.completed_rounds == 2
        rounds = o.store.rounds_of(study_id)
        assert [r.status for r in rounds] == [RoundStatus.COMPLETED] * 3
        assert rounds[0].metrics is not None
        assert rounds[0].metrics["sites"] == 2
        assert set(rounds[2].metrics["per_site"]) == set(SITES)

    run_round_engine(test, tmp_path)


def test_a_round_short_of_its_quorum_fails_the_study_naming_each_missing_site(tmp_path):
    async def test(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=2)
        await o.engine.task_closed(*o.complete(study_id, "north"))
        await o.engine.task_closed(*o.fail(study_id, "east", "dataset_unavailable: gone"))
        await o.engine.task_closed(*o.fail(study_id, "south", "policy_refused: no"))
        study = o.store.get_study(study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason == (
            "round 1: quorum not met: 1 valid update(s), 2 required "
            "(east: failed (dataset_unavailable: gone); south: failed (policy_refused: no))"
        )
        (r,) = o.store.rounds_of(study_id)
        assert r.status is RoundStatus.FAILED

    run_round_engine(test, tmp_path)


def test_the_deadline_times_out_the_late_site_and_the_round_counts_without_it(tmp_path):
    async def test(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=2)
        await o.engine.task_closed(*o.complete(study_id, "north"))
        round_id, _ = o.complete(study_id, "south")
        await o.engine.task_closed(round_id, _)
        await o.engine.finalize(round_id)  # what the round's timer calls at its deadline
        tasks = {t.site: t for t in o.store.tasks_of_round(round_id)}
        assert tasks["east"].status is TaskStatus.TIMED_OUT
        assert tasks["east"].reason == "no result by the round deadline"
        assert o.store.get_round(round_id).status is RoundStatus.COMPLETED
        assert o.open_round(study_id).number == 2

    run_round_engine(test, tmp_path)


def test_a_next_round_the_database_refuses_fails_the_study_instead_of_leaving_the_round_open(
    tmp_path, monkeypatch
):
    async def test(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=1)
        finish_round = o.store.finish_round

        def refuse_next_round(round_id: str, **kwargs: Any) -> Any:
            if kwargs.get("next_round") is not None:
                raise RuntimeError("disk full")
            return finish_round(round_id, **kwargs)

        monkeypatch.setattr(o.store, "finish_round", refuse_next_round)
        for site in SITES:
            await o.engine.task_closed(*o.complete(study_id, site))
        study = o.store.get_study(study_id)
        assert study.status is StudyStatus.FAILED
        assert study.reason == "round 1: internal error while aggregating: RuntimeError: disk full"
        assert [r.status for r in o.store.rounds_of(study_id)] == [RoundStatus.FAILED]

    run_round_engine(test, tmp_path)


def test_a_round_whose_tasks_all_closed_while_the_orchestrator_was_down_closes_when_it_comes_back(tmp_path):
    async def first_life(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=1)
        for site in SITES:  # results stored, but the engine never hears of them: the process "dies"
            o.complete(study_id, site)

    async def second_life(o: RoundEngineHarness) -> None:
        (before,) = o.store.open_rounds()
        assert before.number == 1
        await o.engine.recover()
        (after,) = o.store.open_rounds()
        assert (after.number, after.kind) == (2, TaskKind.TRAIN)
        assert o.store.get_round(before.id).status is RoundStatus.COMPLETED
        assert o.store.get_study(after.study_id).status is StudyStatus.RUNNING

    run_round_engine(first_life, tmp_path)
    run_round_engine(second_life, tmp_path)


def test_a_task_still_open_when_its_closure_is_reported_changes_nothing(tmp_path):
    async def test(o: RoundEngineHarness) -> None:
        study_id = await o.start(min_sites=1)
        r = o.open_round(study_id)
        task = next(t for t in o.store.tasks_of_round(r.id) if t.site == "north")
        assert task.status in (TaskStatus.PENDING, TaskStatus.DELIVERED)
        await o.engine.task_closed(r.id, task.id)  # a caller that did not close it: no event for the rules
        assert o.open_round(study_id).id == r.id

    run_round_engine(test, tmp_path)


def test_closing_the_engine_waits_for_the_report_a_worker_thread_is_still_writing(tmp_path, monkeypatch):
    # The service disposes of the database right after the engine closes: a report thread still querying it
    # then met a dropped schema ("relation rounds does not exist") and left a connection open (CI).
    finished: list[str] = []

    def slow_report(store: Store, study_id: str, folder: Path) -> None:
        time.sleep(0.5)  # the report's queries, still running when the engine is asked to close
        store.rounds_of(study_id)
        finished.append(study_id)

    monkeypatch.setattr("fedhealth.orchestrator._engine.write_report", slow_report)

    async def test(o: RoundEngineHarness) -> None:
        o.engine.reports_dir = tmp_path / "reports"
        study_id = await o.start(min_sites=3)
        await o.engine.task_closed(*o.fail(study_id, "north", "dataset_unavailable: gone"))
        await o.engine.task_closed(*o.fail(study_id, "east", "dataset_unavailable: gone"))
        await o.engine.task_closed(*o.fail(study_id, "south", "dataset_unavailable: gone"))
        assert o.store.get_study(study_id).status is StudyStatus.FAILED
        await asyncio.sleep(0.05)  # the report's thread has started
        await o.engine.close()
        assert finished == [study_id]

    run_round_engine(test, tmp_path)
