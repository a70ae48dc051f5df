"""Attacks on guarantees docs/privacy.md states that no other test attacked (each test names its sentence).

Each plays one adversary against the site's real ``PrivacyGate`` and ``BudgetLedger`` on a real SQLite file:
a study owner or orchestrator writing a session's delta as a string, naming an accountant, choosing a delta
looser than the site's budget, or sending tasks the site must refuse; expected epsilons always come from
the accountant (``fedhealth.privacy.epsilon``), never typed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.data import TabularDataset
from fedhealth.orchestrator._privacy_plan import privacy_plan
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    DpPlan,
    DpSgdRelease,
    epsilon,
    sqlite_engine,
)
from fedhealth.protocol import PrivacySpec, PrivacySpend, RecipeSpec, StudySpec, Task, TaskKind
from fedhealth.runtime import noise_multiplier
from support import logreg_recipe

SITE = "site-a"
DATASET = "cohort"
DELTA = 1e-5
SIGMA, Q, STEPS = 1.2, 0.1, 8


def dp_spec(
    name: str = "study", *, rounds: int = 1, train_sites: tuple[str, ...] = (SITE,), **privacy: object
):
    fields: dict[str, object] = {
        "delta": DELTA,
        "noise_multiplier": SIGMA,
        "max_grad_norm": 1.0,
        "sample_rate": Q,
        "steps_per_round": STEPS,
    }
    fields.update(privacy)
    return StudySpec(
        name=name,
        dataset=DATASET,
        recipe=logreg_recipe(2),
        rounds=rounds,
        train_sites=list(train_sites),
        privacy=PrivacySpec.model_validate(fields),
    )


def stats_spec(**params: object) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "describe",
            "dataset": DATASET,
            "recipe": RecipeSpec(name="stats", params={"features": ["f0"], **params}),
            "rounds": 1,
            "train_sites": [SITE, "site-b", "site-c"],
        }
    )


def ctx(
    spec: StudySpec,
    task_id: str = "t1",
    *,
    round: int = 1,
    kind: TaskKind = TaskKind.TRAIN,
    site: str = SITE,
) -> TaskContext:
    task = Task(
        task_id=task_id,
        study_id=f"st-{spec.name}",
        round=round,
        kind=kind,
        dataset=DATASET,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC),
        spec=spec,
    )
    return TaskContext(task=task, site=site)


def rows(n: int, width: int = 2) -> TabularDataset:
    rng = np.random.default_rng(n)
    return TabularDataset(
        name=DATASET,
        X_train=rng.normal(size=(n, width)),
        y_train=np.arange(n) % 2,
        X_test=rng.normal(size=(2, width)),
        y_test=np.array([0, 1]),
        feature_names=tuple(f"f{i}" for i in range(width)),
    )


def run(gate: PrivacyGate, c: TaskContext) -> PrivacySpend:
    """What the agent does with a task that completes: reserve, read, train, commit, attest."""
    gate.before_data(c)
    gate.prepare_data(c, rows(200))
    c.data_read = True
    gate.after_training(c)
    gate.attest(c)
    return PrivacySpend.model_validate(c.attestation["privacy"])


def ledger_at(path: Path, accountant: AccountantKind = AccountantKind.PLD) -> BudgetLedger:
    engine = sqlite_engine(path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine, accountant=accountant)


def live_entries(path: Path) -> set[tuple[str, str, str, str | None]]:
    """Every ledger entry that counts (reserved or committed), read straight from the file."""
    engine = sqlite_engine(path)
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT reservation_id, status, planned, actual FROM privacy_spend WHERE status != 'released'"
            )
        ).all()
    engine.dispose()
    return {tuple(r) for r in found}  # type: ignore[misc]


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "site.sqlite"


# --- the 1/n rule for a noisy statistics session ------------------------------------------------------------


@pytest.mark.parametrize("written", ["0.2", 0.2], ids=["as-a-string", "as-a-number"])
def test_a_noisy_statistics_session_stating_its_delta_as_a_string_is_still_checked_against_one_over_n(
    db, written
):
    """privacy.md: invalid_privacy for "a delta, the study's, a noisy statistics session's or the budget's, at
    or above 1/n". The recipe reads ``"delta": "0.2"`` as 0.2 (and calibrates its noise at it); the site's
    check used to read the raw JSON, saw no number and let the session compute on 10 rows at delta 0.2."""
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    c = ctx(stats_spec(target_epsilon=1.0, delta=written), kind=TaskKind.COLLECTIVE)
    gate.before_data(c)
    with pytest.raises(TaskRefused) as refused:
        gate.prepare_data(c, rows(10))
    assert refused.value.code == "invalid_privacy"
    gate.on_refused(c, refused.value)
    assert live_entries(db) == set()  # refused before computing: nothing charged


# --- the accountant: the spec's names the calibration, the site's ledger keeps its own ----------------------


@pytest.mark.parametrize("ledger_kind", [AccountantKind.PLD, AccountantKind.RDP])
@pytest.mark.parametrize("spec_kind", ["pld", "rdp"])
def test_the_sites_ledger_charges_with_its_own_accountant_whatever_accountant_the_spec_names(
    db, ledger_kind, spec_kind
):
    """privacy.md, "How epsilon is accounted": a spec's ``accountant`` changes the calibration; "the
    hospital's ledger keeps its own accountant". A spec naming PLD cannot make an RDP ledger charge PLD's
    smaller figure, nor a spec naming RDP change what a PLD ledger charges."""
    ledger_at(db, ledger_kind).set_budget(DATASET, 50.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db), accountant=ledger_kind)
    spend = run(gate, ctx(dp_spec(accountant=spec_kind)))
    plan = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))
    charged = epsilon(plan, delta=DELTA, accountant=ledger_kind)
    other = epsilon(
        plan,
        delta=DELTA,
        accountant=AccountantKind.RDP if ledger_kind is AccountantKind.PLD else AccountantKind.PLD,
    )
    assert not math.isclose(charged, other, rel_tol=1e-3)  # the two accountants do disagree here
    assert spend.task_epsilon == pytest.approx(charged, rel=1e-12)
    assert spend.total_epsilon == pytest.approx(charged, rel=1e-12)
    assert spend.accountant.value == ledger_kind.value


def test_a_target_calibrated_with_rdp_is_never_charged_above_it_by_the_sites_pld_ledger(db):
    """privacy.md: "a study spec's accountant: rdp makes the calibration use RDP, which is more conservative;
    the hospital's ledger keeps its own accountant, PLD"; "target_epsilon is always the record-level epsilon
    each hospital will be charged" (at the spec's delta)."""
    target, rounds = 1.0, 3
    spec = dp_spec(rounds=rounds, accountant="rdp", target_epsilon=target, noise_multiplier=None)
    ledger_at(db).set_budget(DATASET, target, DELTA)  # the budget is the target: every round must fit
    gate = PrivacyGate(sqlite_engine(db))
    spends = [run(gate, ctx(spec, f"t{r}", round=r)) for r in range(1, rounds + 1)]
    sigma = noise_multiplier(spec, SITE)
    whole = DpPlan(releases=(DpSgdRelease(noise_multiplier=sigma, sample_rate=Q, steps=STEPS),) * rounds)
    assert spends[-1].spec_study_epsilon == pytest.approx(epsilon(whole, delta=DELTA), rel=1e-12)
    assert spends[-1].spec_study_epsilon <= target
    assert epsilon(whole, delta=DELTA, accountant=AccountantKind.RDP) <= target


# --- the target is the charge at the spec's delta -----------------------------------------------------------


def test_a_target_is_the_charge_at_the_specs_delta_and_a_stricter_budget_delta_is_charged_more(db):
    """privacy.md, "Calibration": target_epsilon is what each hospital is charged *at the spec's delta*
    (``spec_study_epsilon``); a ledger budgeted at a smaller delta accounts the same releases at its own
    delta, a larger figure, and compares that with its budget. A study cannot buy a smaller charge by
    stating a looser delta: a budget equal to the target refuses it."""
    target, spec_delta, rounds = 1.0, 1e-3, 2
    spec = dp_spec(rounds=rounds, delta=spec_delta, target_epsilon=target, noise_multiplier=None)
    ledger = ledger_at(db)
    ledger.set_budget(DATASET, 50.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    spend = None
    for r in range(1, rounds + 1):
        spend = run(gate, ctx(spec, f"t{r}", round=r))
    assert spend is not None
    sigma = noise_multiplier(spec, SITE)
    whole = DpPlan(releases=(DpSgdRelease(noise_multiplier=sigma, sample_rate=Q, steps=STEPS),) * rounds)
    assert spend.spec_delta == spec_delta
    assert spend.spec_study_epsilon == pytest.approx(epsilon(whole, delta=spec_delta), rel=1e-12)
    assert spend.spec_study_epsilon <= target
    assert spend.study_epsilon == pytest.approx(epsilon(whole, delta=DELTA), rel=1e-12)
    assert spend.study_epsilon > target  # the ledger's figure, at its stricter delta

    (tmp := db.parent / "strict").mkdir()
    ledger_at(tmp / "site.sqlite").set_budget(DATASET, target, DELTA)
    strict = PrivacyGate(sqlite_engine(tmp / "site.sqlite"))
    with pytest.raises(TaskRefused) as refused:
        strict.before_data(ctx(spec, "t1"))
    assert refused.value.code == "budget_exceeded"


# --- composition: the composed figure is what the ledger compares -------------------------------------------


def test_the_ledger_compares_the_composed_figure_with_the_budget_neither_the_sum_nor_the_largest(db):
    """privacy.md: "Epsilons do not add: two studies at epsilon 1 compose to about 1.36 ..., and that
    composed figure is what the ledger compares with the budget". A budget exactly at the composition
    admits the second study; one a hair below it refuses it (a ledger comparing the larger of the two, or
    each study alone, would admit it)."""
    one = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))
    single, both = epsilon(one, delta=DELTA), epsilon(one + one, delta=DELTA)
    assert single < both < 2 * single
    for budget, admitted in ((both, True), (math.nextafter(both, 0.0), False)):
        path = db.parent / f"b{admitted}" / "site.sqlite"
        path.parent.mkdir()
        ledger_at(path).set_budget(DATASET, budget, DELTA)
        gate = PrivacyGate(sqlite_engine(path))
        run(gate, ctx(dp_spec("first"), "t1"))
        second = ctx(dp_spec("second"), "t2")
        if admitted:
            assert run(gate, second).total_epsilon == pytest.approx(both, rel=1e-12)
        else:
            with pytest.raises(TaskRefused) as refused:
                gate.before_data(second)
            assert refused.value.code == "budget_exceeded"


# --- the orchestrator's plan is the site's charge -----------------------------------------------------------


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_the_orchestrators_plan_is_what_each_sites_ledger_charges_for_the_whole_study(db, site):
    """privacy.md: "The hospital and the orchestrator compute it independently from the study spec with the
    same code, so both know exactly what each round will cost" — per site, at its own sampling rate (site-b
    samples at 0.3, not the study's default): the site's own name picks its rate, and the charge of the
    whole study at the spec's delta is the planned epsilon ``POST /api/v1/privacy/plan`` returns."""
    rounds = 2
    spec = dp_spec(
        rounds=rounds,
        train_sites=("site-a", "site-b"),
        target_epsilon=2.0,
        noise_multiplier=None,
        site_sample_rates={"site-b": 0.3},
    )
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    spend = None
    for r in range(1, rounds + 1):
        spend = run(gate, ctx(spec, f"t{r}", round=r, site=site))
    assert spend is not None
    [planned] = [s.planned_epsilon for s in privacy_plan(spec).sites if s.site == site]
    assert planned is not None
    assert spend.spec_study_epsilon == pytest.approx(planned, rel=1e-12)
    assert spend.spec_study_epsilon <= 2.0


# --- nothing is charged on a refusal ------------------------------------------------------------------------


def _over_budget(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    one = epsilon(DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)), delta=DELTA)
    ledger_at(db).set_budget(DATASET, one / 2, DELTA)
    return ctx(dp_spec()), lambda g, c: g.before_data(c)


def _remaining_rounds(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    one = epsilon(DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)), delta=DELTA)
    ledger_at(db).set_budget(DATASET, one * 1.01, DELTA)  # one round fits, three do not
    return ctx(dp_spec(rounds=3)), lambda g, c: g.before_data(c)


def _no_budget(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    ledger_at(db).set_budget("another", 50.0, DELTA)
    return ctx(dp_spec()), lambda g, c: g.before_data(c)


def _invalid(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    return ctx(dp_spec(site_sample_rates={"elsewhere": 0.2})), lambda g, c: g.before_data(c)


def _delta_over_one_over_n(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    ledger_at(db).set_budget(DATASET, 50.0, 0.3)  # the budget's delta 0.3 >= 1/4

    def attempt(g: PrivacyGate, c: TaskContext) -> None:
        g.before_data(c)  # reserved
        g.prepare_data(c, rows(4))

    return ctx(dp_spec()), attempt


def _another_gate_refuses(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)

    def attempt(g: PrivacyGate, c: TaskContext) -> None:
        g.before_data(c)  # reserved; then consent leaves too few patients, before any row is computed on
        raise TaskRefused("min_cohort_k", "fewer than k")

    return ctx(dp_spec()), attempt


def _already_charged(db: Path) -> tuple[TaskContext, Callable[[PrivacyGate, TaskContext], None]]:
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    run(PrivacyGate(sqlite_engine(db)), ctx(dp_spec()))  # t1 ran and was charged (another agent process)
    return ctx(dp_spec()), lambda g, c: g.before_data(c)


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        (_over_budget, "budget_exceeded"),
        (_remaining_rounds, "budget_exceeded"),
        (_no_budget, "budget_not_set"),
        (_invalid, "invalid_privacy"),
        (_delta_over_one_over_n, "invalid_privacy"),
        (_another_gate_refuses, "min_cohort_k"),
        (_already_charged, "budget_already_charged"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_no_refusal_before_a_row_is_computed_on_leaves_a_charge_on_the_ledger(db, setup, code):
    """privacy.md: "A task that is refused, or that fails before it computes anything on patient rows ...
    has its reservation released"; the refusal codes budget_exceeded, budget_not_set, invalid_privacy,
    budget_already_charged, and a refusal by another gate (consent, cohort) after the reservation. Whatever
    the refusal, the ledger's live entries are what they were before the task came."""
    c, attempt = setup(db)
    before = live_entries(db)
    gate = PrivacyGate(sqlite_engine(db))
    with pytest.raises(TaskRefused) as refused:
        attempt(gate, c)
    assert refused.value.code == code
    gate.on_refused(c, refused.value)  # the agent hands every refusal to every gate
    assert live_entries(db) == before
    assert (
        "privacy" not in c.attestation
        or PrivacySpend.model_validate(c.attestation["privacy"]).task_epsilon is None
    )


# --- reproducible noise is never hidden ---------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["1", "", "0"])
def test_every_attestation_states_whether_the_noise_was_reproducible_and_the_agent_warns_of_it(
    db, monkeypatch, caplog, setting
):
    """privacy.md: "A site agent started with FEDHEALTH_REPRODUCIBLE_NOISE=1 draws its DP noise from the
    study seed ...; Each attestation states reproducible_noise, and the agent logs a warning at start-up."
    A site cannot run seed-derived noise and attest (or record in its audit) that it did not."""
    monkeypatch.setenv("FEDHEALTH_REPRODUCIBLE_NOISE", setting)
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    with caplog.at_level("WARNING", logger="fedhealth.agent"):
        gate = PrivacyGate(sqlite_engine(db))
    reproducible = setting == "1"
    assert ("FEDHEALTH_REPRODUCIBLE_NOISE=1" in caplog.text) is reproducible
    spend = run(gate, ctx(dp_spec()))
    assert spend.reproducible_noise is reproducible
