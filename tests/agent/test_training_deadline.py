"""A round's training stops at the task's deadline (core/_deadline.py): past it the orchestrator has closed
the round and takes no update, so a spec the steward approved with many epochs (logreg allows 10,000 of
batches of one row) must not hold the site for hours, nor its memory for every batch of the round at once.

The agent trains under the task's deadline; the built-in recipes check it at every step and stop with
``deadline_passed``, a code and nothing else; the agent then takes its next task as before."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from site_fixtures import agent, approve, make_home, task

from fedhealth.core import DeadlinePassedError, check_deadline, work_deadline
from fedhealth.learning._config import LogRegConfig
from fedhealth.learning._logreg import logreg_train
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import FailureCode, PrivacySpec, StudySpec, TaskKind
from support import logreg_recipe

ROWS = 2_000


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 2))
    rows = [f"secret-{i},{a:.4f},{b:.4f},{int(a + b > 0)}" for i, (a, b) in enumerate(x)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def _spec(epochs: int, **extra: object) -> StudySpec:
    # a round period of 1 s (unless given): the site trains until the deadline and one more period, by its
    # own clock
    return StudySpec(
        name=f"long-{epochs}",
        dataset="cohort",
        recipe=logreg_recipe(2, local_epochs=epochs, batch_size=1, learning_rate=0.01),
        rounds=1,
        train_sites=["hospital-a"],
        **({"round_deadline_s": 1.0} | extra),
    )


@pytest.mark.timeout(120)
def test_training_past_the_tasks_deadline_stops_there_and_the_site_takes_its_next_task(tmp_path):
    csv = _csv(tmp_path / "secret-ward.csv")
    home = make_home(tmp_path / "site")
    long, short = _spec(10_000), _spec(1)  # 20 million steps (minutes), and one pass (milliseconds)
    for spec in (long, short):
        approve(home, spec)
    site, client = agent(home, {"cohort": f"file://{csv}?label=label&id=patient_id"})
    late = task(long).model_copy(update={"deadline": datetime.now(UTC) + timedelta(seconds=2)})
    started = time.monotonic()
    site.handle(late)
    took = time.monotonic() - started
    assert 2.5 < took < 30, f"training stopped after {took:.1f} s, for a deadline 2 s away and a 1 s margin"
    [failure] = client.failures
    assert failure.code is FailureCode.DEADLINE_PASSED
    assert failure.reason == FailureCode.DEADLINE_PASSED.message
    assert not FailureCode.DEADLINE_PASSED.is_refusal
    sent = failure.model_dump_json()
    for secret in ("secret-ward", str(tmp_path), "secret-1"):
        assert secret not in sent
    assert client.results == []
    # the control: the site is free again, and a task that fits its deadline trains and is sent
    site.handle(task(short, task_id="tk-2"))
    [result] = client.results
    assert result.task_id == "tk-2"
    assert result.metrics.num_samples > 0
    assert len(client.failures) == 1


def test_a_task_already_past_its_deadline_is_refused_before_any_row_is_read_and_charges_nothing(tmp_path):
    csv = _csv(tmp_path / "secret-ward.csv")
    home = make_home(tmp_path / "site")
    private = PrivacySpec(
        delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
    )
    spec = _spec(1, privacy=private, round_deadline_s=60.0)
    approve(home, spec)
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    BudgetLedger(engine).set_budget("cohort", 5.0, 1e-5)
    site, client = agent(home, {"cohort": f"file://{csv}?label=label&id=patient_id"})
    # back-dated past the deadline and the margin (a lying orchestrator, or one whose clock is far behind)
    stale = task(spec).model_copy(update={"deadline": datetime.now(UTC) - timedelta(seconds=90)})
    site.handle(stale)
    [failure] = client.failures
    assert failure.code is FailureCode.DEADLINE_PASSED
    assert client.results == []
    statement = BudgetLedger(engine).statement("cohort")
    assert statement.spent_epsilon == 0.0
    assert BudgetLedger(engine).pending("cohort") == []
    # the control: within the margin (a site clock a little ahead) the same task trains, and is charged
    behind = datetime.now(UTC) - timedelta(seconds=20)
    site.handle(task(spec, task_id="tk-2").model_copy(update={"deadline": behind}))
    [result] = client.results
    assert result.task_id == "tk-2"
    assert BudgetLedger(engine).statement("cohort").spent_epsilon > 0


def test_an_evaluation_task_past_its_deadline_is_refused_before_its_dataset_is_opened(tmp_path):
    # the dataset named does not exist: a site that opened it would answer dataset_unavailable
    home = make_home(tmp_path / "site")
    spec = _spec(1, round_deadline_s=60.0)
    approve(home, spec)
    site, client = agent(home, {"cohort": f"file://{tmp_path / 'gone.csv'}?label=label&id=patient_id"})
    stale = datetime.now(UTC) - timedelta(seconds=90)  # past the deadline and its 60 s margin
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=2).model_copy(update={"deadline": stale}))
    assert [f.code for f in client.failures] == [FailureCode.DEADLINE_PASSED]
    assert client.evaluations == []
    # the control: the same task within its deadline opens the dataset (and finds it missing)
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=2, task_id="tk-2"))
    assert [f.code for f in client.failures] == [FailureCode.DEADLINE_PASSED, FailureCode.DATASET_UNAVAILABLE]
    # and with the dataset there, it evaluates and answers
    _csv(tmp_path / "gone.csv")
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=2, task_id="tk-3"))
    [evaluation] = client.evaluations
    assert evaluation.task_id == "tk-3"


def test_logreg_stops_at_the_first_step_past_the_deadline_and_runs_on_without_one():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 2)), np.arange(50) % 2
    start = {"weight": np.zeros(2, np.float32), "bias": np.zeros(1, np.float32)}
    config = LogRegConfig(n_features=2, local_epochs=3, batch_size=5)
    with work_deadline(0.0), pytest.raises(DeadlinePassedError):
        logreg_train(start, X, y, config, np.random.default_rng(1))
    # no deadline, or one far away: the same training as ever, bit for bit
    free = logreg_train(start, X, y, config, np.random.default_rng(1))
    with work_deadline(3600):
        bounded = logreg_train(start, X, y, config, np.random.default_rng(1))
    assert free.steps == bounded.steps == 30
    assert all(free.params[k].tobytes() == bounded.params[k].tobytes() for k in free.params)


def test_a_deadline_holds_in_its_own_thread_only_and_an_inner_one_cannot_extend_it():
    seen: list[bool] = []

    def elsewhere() -> None:
        try:
            check_deadline()
            seen.append(False)
        except DeadlinePassedError:
            seen.append(True)

    with work_deadline(0.0):
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
        with work_deadline(3600), pytest.raises(DeadlinePassedError):
            check_deadline()  # the enclosing deadline, sooner, still holds
        with pytest.raises(DeadlinePassedError):
            check_deadline()
    assert seen == [False]
    check_deadline()  # outside any deadline: nothing to check
