"""The round rules as a pure state machine (issue 11, item 2): events in, commands out, nothing else.

Each rule of ``fedhealth.runtime._rounds`` has an example here, the guards refuse what a driver must never
feed, and property tests drive rounds and whole studies with arbitrary event sequences: a round ends at most
once (never both finishing and failing the study), never aggregates a training round with fewer than
``min_sites`` contributions, aggregates at most once, opens at most ``rounds + 1`` rounds per study, and gives
the same commands for the same events.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhealth.crypto import IdentityKey
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, TaskKind, TaskStatus
from fedhealth.runtime import (
    AbandonSession,
    Aggregate,
    Aggregated,
    AggregationFailed,
    CloseTasks,
    Combination,
    ConcludeSecureSum,
    ConcludeSession,
    DeadlinePassed,
    FailStudy,
    FinishStudy,
    OpenRound,
    Resumed,
    RetrySession,
    RoundCommand,
    RoundEvent,
    RoundPhase,
    RoundState,
    SecureSumDone,
    SecureSumFailed,
    SessionDone,
    SessionFailed,
    StudyRules,
    TaskClosed,
    TaskOutcome,
    first_round,
)
from support import synthetic_recipe

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("north", "east", "south")
CLOSED = (TaskStatus.COMPLETED, TaskStatus.REJECTED, TaskStatus.FAILED, TaskStatus.TIMED_OUT)
TERMINAL = (OpenRound, RetrySession, FinishStudy, FailStudy)


def rules(
    combination: Combination = Combination.PLAIN,
    *,
    rounds: int = 2,
    min_sites: int = 2,
    train: tuple[str, ...] = SITES,
    evaluation: tuple[str, ...] | None = None,
) -> StudyRules:
    return StudyRules(
        rounds=rounds,
        min_sites=min_sites,
        train_sites=train,
        evaluation_sites=train if evaluation is None else evaluation,
        round_deadline_s=60.0,
        combination=combination,
    )


def fresh(r: StudyRules, number: int = 1, kind: TaskKind = TaskKind.TRAIN) -> RoundState:
    sites = r.train_sites if kind is not TaskKind.EVALUATE else r.evaluation_sites
    return RoundState.opened(r, OpenRound(number=number, kind=kind, sites=sites, deadline_at=T0))


def done(site: str) -> TaskClosed:
    return TaskClosed(site=site, status=TaskStatus.COMPLETED)


def feed(state: RoundState, *events: RoundEvent) -> list[RoundCommand]:
    out: list[RoundCommand] = []
    for event in events:
        out.extend(state.handle(event))
    return out


# --- plain rounds ------------------------------------------------------------------------------------------


def test_a_plain_round_aggregates_its_completed_sites_in_site_order_once_every_task_closed():
    state = fresh(rules(min_sites=2))
    assert feed(state, done("south"), TaskClosed(site="north", status=TaskStatus.FAILED, reason="x")) == []
    assert state.phase is RoundPhase.OPEN
    assert feed(state, done("east")) == [Aggregate(contributors=("east", "south"))]
    assert state.phase is RoundPhase.AGGREGATING


def test_a_plain_round_with_too_few_results_fails_the_study_naming_each_missing_site():
    state = fresh(rules(min_sites=2))
    commands = feed(
        state,
        done("east"),
        TaskClosed(site="north", status=TaskStatus.REJECTED, reason="not a safetensors file"),
        TaskClosed(site="south", status=TaskStatus.FAILED, reason="budget_exhausted: epsilon"),
    )
    assert commands == [
        FailStudy(
            round=1,
            reason="quorum not met: 1 valid update(s), 2 required (north: rejected (not a safetensors file); "
            "south: failed (budget_exhausted: epsilon))",
        )
    ]
    assert commands[0].study_reason.startswith("round 1: quorum not met: 1 valid update(s), 2 required")
    assert state.phase is RoundPhase.ENDED


def test_the_deadline_times_out_the_late_tasks_first_then_counts_what_completed():
    state = fresh(rules(min_sites=2))
    feed(state, done("north"), done("south"))
    timed_out = TaskOutcome(
        site="east", status=TaskStatus.TIMED_OUT, reason="no result by the round deadline"
    )
    assert feed(state, DeadlinePassed()) == [
        CloseTasks(outcomes=(timed_out,)),
        Aggregate(contributors=("north", "south")),
    ]
    assert state.tasks["east"] == timed_out
    assert state.open_sites == ()


def test_the_deadline_with_too_few_results_fails_the_study_with_the_timed_out_sites_named():
    state = fresh(rules(min_sites=3))
    feed(state, done("north"))
    commands = feed(state, DeadlinePassed())
    assert isinstance(commands[0], CloseTasks)
    assert [o.site for o in commands[0].outcomes] == ["east", "south"]
    (fail,) = commands[1:]
    assert isinstance(fail, FailStudy)
    assert fail.reason.startswith("quorum not met: 1 valid update(s), 3 required (east: timed_out (no result")


def test_after_a_training_round_the_next_one_opens_over_the_training_sites_with_a_fresh_deadline():
    r = rules(rounds=3, min_sites=1)
    state = fresh(r, number=2)
    feed(state, done("north"), done("east"), done("south"))
    at = T0 + timedelta(hours=1)
    assert state.handle(Aggregated(at=at)) == (
        OpenRound(number=3, kind=TaskKind.TRAIN, sites=SITES, deadline_at=at + timedelta(seconds=60)),
    )
    assert state.phase is RoundPhase.ENDED


def test_after_the_last_training_round_the_evaluation_round_opens_over_the_evaluation_sites():
    r = rules(rounds=2, min_sites=1, evaluation=("west",))
    state = fresh(r, number=2)
    feed(state, done("north"), done("east"), done("south"))
    (opened,) = state.handle(Aggregated(at=T0))
    assert opened == OpenRound(
        number=3, kind=TaskKind.EVALUATE, sites=("west",), deadline_at=T0 + timedelta(seconds=60)
    )
    assert RoundState.opened(r, opened).open_sites == ("west",)


def test_a_plain_evaluation_round_needs_no_quorum_and_finishes_the_study_naming_who_gave_nothing():
    state = fresh(rules(rounds=1, min_sites=3), number=2, kind=TaskKind.EVALUATE)
    commands = feed(state, done("north"), TaskClosed(site="east", status=TaskStatus.FAILED, reason="why"))
    assert commands == []
    commands = feed(state, DeadlinePassed())
    assert commands[-1] == Aggregate(contributors=("north",))
    assert state.handle(Aggregated(at=T0)) == (
        FinishStudy(
            note="no evaluation from east: failed (why); south: timed_out (no result by the round deadline)"
        ),
    )


def test_an_evaluation_round_without_any_result_still_finishes_the_study():
    state = fresh(rules(rounds=1, min_sites=1), number=2, kind=TaskKind.EVALUATE)
    assert feed(state, DeadlinePassed())[-1] == Aggregate(contributors=())
    missing = "; ".join(f"{s}: timed_out (no result by the round deadline)" for s in sorted(SITES))
    assert feed(state, Aggregated(at=T0)) == [FinishStudy(note=f"no evaluation from {missing}")]


def test_a_fully_answered_evaluation_finishes_without_a_note():
    state = fresh(rules(rounds=1, min_sites=1), number=2, kind=TaskKind.EVALUATE)
    feed(state, *(done(s) for s in SITES))
    assert state.handle(Aggregated(at=T0)) == (FinishStudy(note=None),)


def test_a_failed_aggregation_fails_the_study_and_nothing_follows():
    state = fresh(rules(min_sites=1))
    feed(state, *(done(s) for s in SITES))
    assert state.handle(AggregationFailed(reason="round could not be aggregated: bad tensor")) == (
        FailStudy(round=1, reason="round could not be aggregated: bad tensor"),
    )
    assert (
        feed(state, Aggregated(at=T0), DeadlinePassed(), AggregationFailed(reason="again"), done("north"))
        == []
    )


def test_events_after_the_round_ended_change_nothing():
    state = fresh(rules(min_sites=1))
    feed(state, *(done(s) for s in SITES))
    feed(state, Aggregated(at=T0))
    late = [done("north"), DeadlinePassed(), Resumed(), Aggregated(at=T0)]
    assert feed(state, *late) == []
    assert state.phase is RoundPhase.ENDED


def test_a_repeated_task_closure_is_ignored_and_keeps_the_first_outcome():
    state = fresh(rules(min_sites=1))
    feed(state, TaskClosed(site="north", status=TaskStatus.FAILED, reason="first"))
    assert feed(state, done("north")) == []
    assert state.tasks["north"].reason == "first"


def test_a_deadline_during_the_aggregation_is_ignored():
    state = fresh(rules(min_sites=1))
    feed(state, *(done(s) for s in SITES))
    assert feed(state, DeadlinePassed(), DeadlinePassed()) == []
    assert state.phase is RoundPhase.AGGREGATING


def test_a_resumed_round_closes_at_once_only_if_every_task_closed_meanwhile():
    r = rules(min_sites=1)
    open_one = RoundState(
        r,
        number=1,
        kind=TaskKind.TRAIN,
        tasks=[
            TaskOutcome(site="north", status=TaskStatus.COMPLETED),
            TaskOutcome(site="east", status=TaskStatus.DELIVERED),
        ],
    )
    assert open_one.handle(Resumed()) == ()
    all_closed = RoundState(
        r,
        number=1,
        kind=TaskKind.TRAIN,
        tasks=[
            TaskOutcome(site="north", status=TaskStatus.COMPLETED),
            TaskOutcome(site="east", status=TaskStatus.FAILED, reason="x"),
        ],
    )
    assert all_closed.handle(Resumed()) == (Aggregate(contributors=("north",)),)


# --- secure rounds ------------------------------------------------------------------------------------------


def test_a_secure_round_closing_asks_how_its_sum_ended_and_fails_with_the_sum_s_reason():
    state = fresh(rules(Combination.SECURE, min_sites=1))
    failures = [TaskClosed(site=s, status=TaskStatus.FAILED, reason="no approval") for s in SITES]
    assert feed(state, *failures) == [ConcludeSecureSum()]
    assert state.phase is RoundPhase.CONCLUDING
    assert state.handle(SecureSumFailed(reason="secure aggregation did not finish")) == (
        FailStudy(round=1, reason="secure aggregation did not finish"),
    )


def test_a_secure_sum_counts_its_contributors_and_names_the_others_as_dropped():
    state = fresh(rules(Combination.SECURE, min_sites=2))
    commands = feed(state, SecureSumDone(contributors=("south", "north")))
    close, aggregate = commands
    assert close == CloseTasks(
        outcomes=(
            TaskOutcome(
                site="east",
                status=TaskStatus.TIMED_OUT,
                reason="dropped out of secure aggregation before the round ended",
            ),
            TaskOutcome(site="north", status=TaskStatus.COMPLETED),
            TaskOutcome(site="south", status=TaskStatus.COMPLETED),
        )
    )
    assert aggregate == Aggregate(contributors=("north", "south"))


def test_a_secure_training_sum_over_fewer_than_min_sites_fails_the_study():
    state = fresh(rules(Combination.SECURE, min_sites=2))
    commands = feed(state, SecureSumDone(contributors=("east",)))
    assert commands[-1] == FailStudy(round=1, reason="quorum not met: 1 contributor(s), 2 required")
    assert not any(isinstance(c, Aggregate) for c in commands)


def test_a_secure_evaluation_needs_one_contributor_and_names_the_sites_without_one():
    r = rules(Combination.SECURE, rounds=1, min_sites=3)
    empty = fresh(r, number=2, kind=TaskKind.EVALUATE)
    assert feed(empty, SecureSumDone(contributors=()))[-1] == FailStudy(
        round=2, reason="quorum not met: 0 contributor(s), 1 required"
    )
    state = fresh(r, number=2, kind=TaskKind.EVALUATE)
    assert feed(state, SecureSumDone(contributors=("north",)))[-1] == Aggregate(contributors=("north",))
    assert state.handle(Aggregated(at=T0)) == (FinishStudy(note="no evaluation from east, south"),)


def test_a_secure_round_at_its_deadline_asks_again_until_its_driver_answers():
    state = fresh(rules(Combination.SECURE, min_sites=1))
    assert feed(state, DeadlinePassed(), DeadlinePassed()) == [ConcludeSecureSum(), ConcludeSecureSum()]
    assert feed(state, SecureSumDone(contributors=SITES))[-1] == Aggregate(contributors=tuple(sorted(SITES)))
    assert feed(state, SecureSumDone(contributors=SITES), SecureSumFailed(reason="late")) == []


def test_a_failed_secure_sum_closes_the_open_tasks_as_dropped_and_fails_the_study():
    state = fresh(rules(Combination.SECURE, min_sites=1))
    feed(state, TaskClosed(site="north", status=TaskStatus.FAILED, reason="policy"))
    close, fail = feed(state, SecureSumFailed(reason="too_few_sites: 2 signed"))
    assert isinstance(close, CloseTasks)
    assert [(o.site, o.status) for o in close.outcomes] == [
        ("east", TaskStatus.TIMED_OUT),
        ("south", TaskStatus.TIMED_OUT),
    ]
    assert fail == FailStudy(round=1, reason="too_few_sites: 2 signed")
    assert state.tasks["north"].reason == "policy"


# --- session rounds -----------------------------------------------------------------------------------------


def test_a_session_round_is_round_one_of_kind_collective():
    r = rules(Combination.SESSION, rounds=1)
    assert first_round(r, T0) == OpenRound(
        number=1, kind=TaskKind.COLLECTIVE, sites=SITES, deadline_at=T0 + timedelta(seconds=60)
    )
    with pytest.raises(ValueError, match="not a round of this study"):
        fresh(r, number=2, kind=TaskKind.COLLECTIVE)


def test_a_lost_participant_ends_the_session_for_everyone():
    state = fresh(rules(Combination.SESSION, rounds=1), kind=TaskKind.COLLECTIVE)
    lost = TaskClosed(site="east", status=TaskStatus.FAILED, reason="dataset_unavailable")
    assert state.handle(lost) == (AbandonSession(reason="east's task ended (dataset_unavailable)"),)
    close, fail = state.handle(SessionFailed(reason="collective session failed: site_lost"))
    assert isinstance(close, CloseTasks)
    assert {(o.site, o.status, o.reason) for o in close.outcomes} == {
        ("north", TaskStatus.FAILED, "collective session failed: site_lost"),
        ("south", TaskStatus.FAILED, "collective session failed: site_lost"),
    }
    assert fail == FailStudy(round=1, reason="collective session failed: site_lost")


def test_a_completed_session_completes_every_task_and_finishes_the_study():
    state = fresh(rules(Combination.SESSION, rounds=1), kind=TaskKind.COLLECTIVE)
    close, aggregate = state.handle(SessionDone())
    assert isinstance(close, CloseTasks)
    assert {o.status for o in close.outcomes} == {TaskStatus.COMPLETED}
    assert aggregate == Aggregate(contributors=tuple(sorted(SITES)))
    assert state.handle(Aggregated(at=T0)) == (FinishStudy(note=None),)


def test_a_session_round_closing_asks_how_its_session_ended():
    state = fresh(rules(Combination.SESSION, rounds=1), kind=TaskKind.COLLECTIVE)
    assert state.handle(DeadlinePassed()) == (ConcludeSession(),)
    assert state.handle(SessionFailed(reason="did not finish"))[-1] == FailStudy(
        round=1, reason="did not finish"
    )


def test_a_failed_session_of_a_study_with_retries_opens_the_next_session_round():
    r = StudyRules(
        rounds=1,
        min_sites=1,
        train_sites=SITES,
        evaluation_sites=SITES,
        round_deadline_s=60.0,
        combination=Combination.SESSION,
        session_attempts=2,
    )
    state = fresh(r, kind=TaskKind.COLLECTIVE)
    state.handle(TaskClosed(site="east", status=TaskStatus.FAILED, reason="internal_error"))
    close, retry = state.handle(SessionFailed(reason="collective session failed: site_lost"))
    assert isinstance(close, CloseTasks)
    assert {o.status for o in close.outcomes} == {TaskStatus.FAILED}
    assert retry == RetrySession(reason="collective session failed: site_lost", number=2, sites=SITES)
    assert state.phase is RoundPhase.ENDED
    assert state.handle(SessionDone()) == ()  # nothing after the round's end
    last = fresh(r, number=2, kind=TaskKind.COLLECTIVE)  # the retry is a round of this study; a third is not
    assert last.handle(SessionFailed(reason="lost again"))[-1] == FailStudy(round=2, reason="lost again")
    with pytest.raises(ValueError, match="not a round of this study"):
        fresh(r, number=3, kind=TaskKind.COLLECTIVE)


def test_the_session_attempts_are_the_recipe_s_retries_plus_one():
    keys = {s: IdentityKey.generate().public().fingerprint for s in SITES}
    spec = StudySpec(
        name="gbdt",
        dataset="heart",
        recipe=RecipeSpec(name="lightgbm", params={"n_features": 4, "retries": 2}),
        rounds=1,
        train_sites=list(SITES),
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )
    assert StudyRules.of(spec).session_attempts == 3
    bare = spec.model_copy(update={"recipe": RecipeSpec(name="lightgbm", params={"n_features": 4})})
    assert StudyRules.of(bare).session_attempts == 1


def test_a_session_s_unusable_result_fails_the_study():
    state = fresh(rules(Combination.SESSION, rounds=1), kind=TaskKind.COLLECTIVE)
    state.handle(SessionDone())
    reason = "the session's result is unusable: nothing released"
    assert state.handle(AggregationFailed(reason=reason)) == (FailStudy(round=1, reason=reason),)


# --- guards ---------------------------------------------------------------------------------------------


def test_a_task_the_round_does_not_have_is_refused():
    with pytest.raises(ValueError, match="'west' has no task in round 1"):
        fresh(rules()).handle(done("west"))


def test_a_closure_with_an_open_status_is_refused():
    with pytest.raises(ValueError, match="a closed task cannot be delivered"):
        fresh(rules()).handle(TaskClosed(site="north", status=TaskStatus.DELIVERED))


@pytest.mark.parametrize(
    ("combination", "event"),
    [
        (Combination.PLAIN, SecureSumDone(contributors=())),
        (Combination.PLAIN, SessionDone()),
        (Combination.SECURE, SessionFailed(reason="x")),
        (Combination.SESSION, SecureSumFailed(reason="x")),
    ],
)
def test_an_event_of_another_combination_is_refused(combination, event):
    kind = TaskKind.COLLECTIVE if combination is Combination.SESSION else TaskKind.TRAIN
    state = fresh(rules(combination, rounds=1), kind=kind)
    with pytest.raises(ValueError, match=f"{type(event).__name__} in a {combination.value} round"):
        state.handle(event)


def test_contributors_that_are_not_the_round_s_sites_are_refused():
    state = fresh(rules(Combination.SECURE))
    with pytest.raises(ValueError, match="not distinct sites of round 1"):
        state.handle(SecureSumDone(contributors=("north", "mallory")))
    with pytest.raises(ValueError, match="not distinct sites of round 1"):
        state.handle(SecureSumDone(contributors=("north", "north")))


def test_a_round_that_does_not_fit_the_study_is_refused():
    r = rules(rounds=2)
    for number, kind in [
        (0, TaskKind.TRAIN),
        (0, TaskKind.COLLECTIVE),  # no scaling pre-step in this study
        (3, TaskKind.TRAIN),
        (2, TaskKind.EVALUATE),
        (4, TaskKind.EVALUATE),
    ]:
        with pytest.raises(ValueError, match="not a round of this study"):
            RoundState(r, number=number, kind=kind, tasks=())
    with pytest.raises(ValueError, match="two tasks"):
        RoundState(
            r,
            number=1,
            kind=TaskKind.TRAIN,
            tasks=[TaskOutcome(site="a", status=TaskStatus.PENDING)] * 2,
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rounds": 0}, "at least one training round"),
        ({"min_sites": 4}, "min_sites=4 with 3 training sites"),
        ({"min_sites": 0}, "min_sites=0"),
        ({"train_sites": ("a", "a")}, "named twice"),
        ({"round_deadline_s": 0.0}, "not positive"),
        ({"combination": Combination.SESSION, "scaling_step": True}, "a collective study has no scaling"),
    ],
)
def test_study_rules_that_cannot_hold_are_refused(fields, message):
    base = {
        "rounds": 1,
        "min_sites": 1,
        "train_sites": SITES,
        "evaluation_sites": SITES,
        "round_deadline_s": 1.0,
        "combination": Combination.PLAIN,
    }
    with pytest.raises(ValueError, match=message):
        StudyRules(**{**base, **fields})


def test_rules_of_a_spec_follow_its_recipe_and_secure_aggregation():
    keys = {s: IdentityKey.generate().public().fingerprint for s in SITES}
    plain = StudySpec(name="p", dataset="none", recipe=synthetic_recipe(4), rounds=3, train_sites=list(SITES))
    secure = plain.model_copy(update={"secure_aggregation": SecureAggregationSpec(site_keys=keys)})
    session = secure.model_copy(update={"recipe": RecipeSpec(name="collective-probe", params={"size": 8})})
    assert StudyRules.of(plain) == StudyRules(
        rounds=3,
        min_sites=1,
        train_sites=SITES,
        evaluation_sites=SITES,
        round_deadline_s=plain.round_deadline_s,
        combination=Combination.PLAIN,
    )
    assert StudyRules.of(secure).combination is Combination.SECURE
    assert StudyRules.of(session).combination is Combination.SESSION
    assert StudyRules.of(secure, Combination.PLAIN).combination is Combination.PLAIN  # the in-memory runner's


# --- properties -------------------------------------------------------------------------------------------


@st.composite
def study_rules(draw: st.DrawFn) -> StudyRules:
    n = draw(st.integers(1, 4))
    sites = tuple(f"s{i}" for i in range(n))
    combination = draw(st.sampled_from(list(Combination)))
    return StudyRules(
        rounds=1 if combination is Combination.SESSION else draw(st.integers(1, 3)),
        min_sites=draw(st.integers(1, n)),
        train_sites=sites,
        evaluation_sites=sites[: draw(st.integers(1, n))],
        round_deadline_s=10.0,
        combination=combination,
        # the scaling pre-step (round 0) of standardize = "federated": a rounds study's
        scaling_step=combination is not Combination.SESSION and draw(st.booleans()),
        session_attempts=draw(st.integers(1, 2)) if combination is Combination.SESSION else 1,
    )


def round_events(
    r: StudyRules, sites: tuple[str, ...], combination: Combination | None = None
) -> st.SearchStrategy[list[RoundEvent]]:
    combination = combination or r.combination
    choices: list[st.SearchStrategy[RoundEvent]] = [
        st.builds(
            TaskClosed, site=st.sampled_from(sites), status=st.sampled_from(CLOSED), reason=st.just("r")
        ),
        st.just(DeadlinePassed()),
        st.just(Resumed()),
        st.builds(Aggregated, at=st.just(T0)),
        st.builds(AggregationFailed, reason=st.just("broken")),
    ]
    if combination is Combination.SECURE:
        subsets = st.lists(st.sampled_from(sites), unique=True).map(tuple)
        choices += [st.builds(SecureSumDone, contributors=subsets), st.just(SecureSumFailed(reason="lost"))]
    if combination is Combination.SESSION:
        choices += [st.just(SessionDone()), st.just(SessionFailed(reason="lost"))]
    return st.lists(st.one_of(choices), max_size=12)


def check_round(state: RoundState, events: list[RoundEvent]) -> list[RoundCommand]:
    """Feed ``events`` and check every invariant of one round; returns the commands."""
    commands: list[RoundCommand] = []
    closed: set[str] = set()
    aggregated: Aggregate | None = None
    for event in events:
        before = state.phase
        out = list(state.handle(event))
        if before is RoundPhase.ENDED:
            assert out == [], "an ended round takes no event"
        for command in out:
            assert not any(isinstance(c, TERMINAL) for c in commands), "nothing follows the round's end"
            if isinstance(command, CloseTasks):
                sites = {o.site for o in command.outcomes}
                assert not sites & closed, "a task is closed once"
                closed |= sites
            if isinstance(command, Aggregate):
                assert aggregated is None, "a round is aggregated once"
                aggregated = command
                assert list(command.contributors) == sorted(set(command.contributors))
                if state.kind is TaskKind.TRAIN:
                    assert len(command.contributors) >= state.rules.min_sites
                if state.combination is Combination.PLAIN:
                    assert all(state.tasks[s].status is TaskStatus.COMPLETED for s in command.contributors)
            if isinstance(command, (OpenRound, FinishStudy)):
                assert aggregated is not None, "a round counts only once aggregated"
                assert state.open_sites == (), "a counted round leaves no task open"
            commands.append(command)
        assert (state.phase is RoundPhase.ENDED) == any(isinstance(c, TERMINAL) for c in commands)
    assert sum(isinstance(c, TERMINAL) for c in commands) <= 1
    return commands


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_event_sequence_keeps_the_round_invariants_and_is_deterministic(data):
    r = data.draw(study_rules())
    first = 0 if r.scaling_step else 1
    number = data.draw(st.integers(first, 1 if r.combination is Combination.SESSION else r.rounds + 1))
    session = r.combination is Combination.SESSION or number == 0
    kind = TaskKind.COLLECTIVE if session else None
    kind = kind or (TaskKind.TRAIN if number <= r.rounds else TaskKind.EVALUATE)
    sites = r.evaluation_sites if kind is TaskKind.EVALUATE else r.train_sites
    events = data.draw(round_events(r, sites, Combination.SESSION if session else None))
    commands = check_round(fresh(r, number, kind), events)
    assert check_round(fresh(r, number, kind), events) == commands  # the same events, the same commands


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_study_driven_to_its_end_finishes_or_fails_once_within_rounds_plus_one_rounds(data):
    r = data.draw(study_rules())
    opening: OpenRound | None = first_round(r, T0)
    opened = 0
    ends: list[RoundCommand] = []
    while opening is not None:
        opened += 1
        assert opened <= (
            r.session_attempts if r.combination is Combination.SESSION else r.rounds + 1 + int(r.scaling_step)
        )
        state = RoundState.opened(r, opening)
        events = [
            TaskClosed(site=s, status=data.draw(st.sampled_from(CLOSED)), reason="r") for s in opening.sites
        ]
        if state.combination is Combination.SECURE:
            events.append(
                SecureSumDone(contributors=tuple(data.draw(st.sets(st.sampled_from(opening.sites)))))
            )
        if state.combination is Combination.SESSION:
            events.append(data.draw(st.sampled_from([SessionDone(), SessionFailed(reason="lost")])))
        events += [DeadlinePassed(), Aggregated(at=T0)]
        opening = None
        for command in check_round(state, events):
            if isinstance(command, OpenRound):
                assert command.number == state.number + 1
                opening = command
            elif isinstance(command, RetrySession):  # the driver opens it with a fresh deadline
                assert command.number == state.number + 1
                opening = OpenRound(
                    number=command.number, kind=state.kind, sites=command.sites, deadline_at=T0
                )
            elif isinstance(command, (FinishStudy, FailStudy)):
                ends.append(command)
    assert len(ends) == 1, "a study ends once: finished or failed, never both"
