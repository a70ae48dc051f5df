"""The round rules, once: when a round closes, what it needs to count, and what follows it.

A :class:`RoundState` is one round of one study as a sans-IO state machine, like the SecAgg+ cores of
``fedhealth.secagg``: its driver feeds it events (a task closed, the deadline passed, the secure sum or the
collective session ended, the aggregation it asked for is done or failed) and carries out the commands it
returns (close these tasks, aggregate these contributors, open the next round, finish or fail the study). It
reads no clock (time comes in the events that need it), does no I/O and draws nothing at random: the same
events give the same commands. The orchestrator's round engine drives it against the database and over the
agent API; :func:`~fedhealth.runtime.run_study_in_memory` drives it in one loop.

The rules (``tests/runtime/test_round_state.py`` checks each):

- A round closes when every task of it is closed, or at its deadline, whichever comes first. A plain round
  then times out its open tasks; a secure round asks its driver how the secure sum ended
  (:class:`ConcludeSecureSum`), a session round how the session ended (:class:`ConcludeSession`). A secure sum
  or session that ends on its own closes the round too.
- A training round counts with at least ``min_sites`` contributions (completed tasks; the contributors of a
  secure sum); fewer fails the study. A secure evaluation round needs one contributor, a plain one none. A
  session round counts when its session completed: every participant or nobody.
- In a session round, a participant's task ending without completing ends the session for everyone
  (:class:`AbandonSession`); there is no dropout recovery inside a session. A failed session round of a
  study whose recipe allows retries (``session_attempts`` > its number) fails alone and the next session
  round opens over the same sites (:class:`RetrySession`); the recipe resumes from its sites' checkpoints.
- A counted round is aggregated once (:class:`Aggregate`, contributors in site order). After a training round
  the next training round opens over the training sites, after the last one the evaluation round over the
  evaluation sites; an evaluation or session round finishes the study, naming the sites that gave nothing.
- A study with a scaling pre-step (``standardize = "federated"``, :mod:`fedhealth.runtime._scaling`)
  opens round 0 first: a session round over the training sites, of kind collective, whatever the study's
  combination (every participant or nobody); once counted and aggregated (the driver reads the release)
  it opens training round 1. Rounds 1 onwards are combined as the study says.
- A round ends with exactly one of :class:`OpenRound`, :class:`FinishStudy` or :class:`FailStudy`, and takes
  no event after that (a late one is ignored, not an error: a result retried after the round closed, a timer
  that fired while it closed).

What a driver alone knows stays with it: which stage a site dropped out at, what a site attested, the
model's tensors. Retries of a secure round after an orchestrator restart are a new attempt of the same round
(the driver's business); the round's rules do not change with the attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from fedhealth.protocol import StudySpec, TaskKind, TaskStatus
from fedhealth.runtime._collective import is_collective, session_attempts
from fedhealth.runtime._scaling import SCALING_ROUND, federated_scaling_requested

_OPEN = frozenset({TaskStatus.PENDING, TaskStatus.DELIVERED})
DEADLINE_REASON = "no result by the round deadline"
DROPPED_REASON = "dropped out of secure aggregation before the round ended"


class Combination(StrEnum):
    """How a study's rounds turn the sites' results into one."""

    PLAIN = "plain"  # each site's update reaches the orchestrator, which averages them
    SECURE = "secure"  # SecAgg+: the orchestrator learns only the sum over the contributors
    SESSION = "session"  # one collective session (a single round): every participant or nobody


class RoundPhase(StrEnum):
    OPEN = "open"  # tasks are running
    CONCLUDING = "concluding"  # the round must close: waiting for how its secure sum or session ended
    AGGREGATING = "aggregating"  # counted: waiting for the driver's aggregation
    ENDED = "ended"  # the next round opened, or the study finished or failed


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyRules:
    """What the round rules read from a study spec."""

    rounds: int
    min_sites: int
    train_sites: tuple[str, ...]
    evaluation_sites: tuple[str, ...]
    round_deadline_s: float
    combination: Combination
    scaling_step: bool = False  # round 0: the secure-sum scaling pre-step (standardize = "federated")
    session_attempts: int = 1  # session rounds a collective study may run: the first and its retries

    def __post_init__(self) -> None:
        if self.session_attempts < 1:
            raise ValueError(f"session_attempts={self.session_attempts}: a study has at least one session")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: a study has at least one training round")
        if not 1 <= self.min_sites <= len(self.train_sites):
            raise ValueError(f"min_sites={self.min_sites} with {len(self.train_sites)} training sites")
        for sites in (self.train_sites, self.evaluation_sites):
            if len(set(sites)) != len(sites):
                raise ValueError(f"a site is named twice in {list(sites)}")
        if not self.round_deadline_s > 0:
            raise ValueError(f"round_deadline_s={self.round_deadline_s} is not positive")
        if self.scaling_step and self.combination is Combination.SESSION:
            raise ValueError("a collective study has no scaling pre-step: it trains no rounds")

    @classmethod
    def of(cls, spec: StudySpec, combination: Combination | None = None) -> StudyRules:
        """The rules of ``spec``, combined as the spec says unless ``combination`` overrides it (the
        in-memory runner computes every study the plain way)."""
        if combination is None:
            if is_collective(spec):
                combination = Combination.SESSION
            elif spec.secure_aggregation is not None:
                combination = Combination.SECURE
            else:
                combination = Combination.PLAIN
        return cls(
            rounds=spec.rounds,
            min_sites=spec.min_sites,
            train_sites=tuple(spec.train_sites),
            evaluation_sites=tuple(spec.evaluation_sites),
            round_deadline_s=spec.round_deadline_s,
            combination=combination,
            scaling_step=federated_scaling_requested(spec.recipe),
            session_attempts=session_attempts(spec) if combination is Combination.SESSION else 1,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOutcome:
    """A site's task in a round: its status and, once it closed without a result, why."""

    site: str
    status: TaskStatus
    reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status in _OPEN


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskClosed:
    """A site's task closed: completed with a result, or rejected, failed or timed out with a reason."""

    site: str
    status: TaskStatus
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadlinePassed:
    """The round's deadline passed (the driver's timer says so; the machine reads no clock)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed:
    """The round was taken up again after a restart: it closes at once if every task closed meanwhile."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureSumDone:
    """The secure sum released its result over ``contributors`` (a secure round only)."""

    contributors: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureSumFailed:
    """The secure sum ended without a result (a secure round only)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionDone:
    """The collective session completed (a session round only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFailed:
    """The collective session ended without completing (a session round only)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Aggregated:
    """The driver aggregated the round as asked, at ``at`` (the next round's deadline counts from it)."""

    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationFailed:
    """The round could not be aggregated (or closed at all): the study fails with ``reason``."""

    reason: str


RoundEvent = (
    TaskClosed
    | DeadlinePassed
    | Resumed
    | SecureSumDone
    | SecureSumFailed
    | SessionDone
    | SessionFailed
    | Aggregated
    | AggregationFailed
)


# --- commands --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTasks:
    """Close these still-open tasks as given (all at once: nothing is accepted from them afterwards)."""

    outcomes: tuple[TaskOutcome, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcludeSecureSum:
    """The round closes now: stop the secure sum and answer with :class:`SecureSumDone` if it completed
    (its result stands), else :class:`SecureSumFailed`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcludeSession:
    """The round closes now: stop the session and answer with :class:`SessionDone` if it completed, else
    :class:`SessionFailed`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonSession:
    """A participant is lost: fail the running session for everyone with ``reason`` (the driver answers with
    :class:`SessionFailed` once the session has ended)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Aggregate:
    """Combine the round's results from ``contributors`` (site order), then answer with :class:`Aggregated`
    or :class:`AggregationFailed`."""

    contributors: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenRound:
    """This round counted: open round ``number`` of ``kind`` over ``sites`` until ``deadline_at``."""

    number: int
    kind: TaskKind
    sites: tuple[str, ...]
    deadline_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrySession:
    """This session round failed with ``reason`` but the study may retry: close it as failed (the study goes
    on) and open session round ``number`` over ``sites``, with a fresh deadline from the driver's clock."""

    reason: str
    number: int
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishStudy:
    """This round counted and was the study's last: the study completed (``note``: who gave nothing)."""

    note: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailStudy:
    """Round ``round`` failed with ``reason``, and the study with it."""

    round: int
    reason: str

    @property
    def study_reason(self) -> str:
        return f"round {self.round}: {self.reason}"


RoundCommand = (
    CloseTasks
    | ConcludeSecureSum
    | ConcludeSession
    | AbandonSession
    | Aggregate
    | OpenRound
    | RetrySession
    | FinishStudy
    | FailStudy
)


def first_round(rules: StudyRules, at: datetime) -> OpenRound:
    """The round a study starts with (once its sites approved it, at ``at``): its scaling pre-step if it
    has one, else round 1."""
    number = SCALING_ROUND if rules.scaling_step else 1
    return OpenRound(
        number=number,
        kind=_kind_of(rules, number),
        sites=rules.train_sites,
        deadline_at=at + timedelta(seconds=rules.round_deadline_s),
    )


def _kind_of(rules: StudyRules, number: int) -> TaskKind:
    if rules.combination is Combination.SESSION or number == SCALING_ROUND:
        return TaskKind.COLLECTIVE
    return TaskKind.TRAIN if number <= rules.rounds else TaskKind.EVALUATE


class RoundState:
    """One round of a study: events in, commands out (see the module's docstring for the rules)."""

    def __init__(
        self, rules: StudyRules, *, number: int, kind: TaskKind, tasks: Iterable[TaskOutcome]
    ) -> None:
        """A round as it stands: a fresh one (every task open) or one taken up again after a restart."""
        last = rules.session_attempts if rules.combination is Combination.SESSION else rules.rounds + 1
        first = SCALING_ROUND if rules.scaling_step else 1
        if not first <= number <= last or kind is not _kind_of(rules, number):
            raise ValueError(f"round {number} of kind {kind.value} is not a round of this study")
        self.rules = rules
        self.number = number
        self.kind = kind
        # the scaling pre-step is a session round whatever the study's combination
        scaling = rules.scaling_step and number == SCALING_ROUND
        self.combination = Combination.SESSION if scaling else rules.combination
        self.phase = RoundPhase.OPEN
        self._contributors: tuple[str, ...] = ()
        self._tasks: dict[str, TaskOutcome] = {}
        for task in tasks:
            if task.site in self._tasks:
                raise ValueError(f"site {task.site!r} has two tasks in round {number}")
            self._tasks[task.site] = task

    @classmethod
    def opened(cls, rules: StudyRules, command: OpenRound) -> RoundState:
        """The round ``command`` opens, each of its sites with a task not yet delivered."""
        return cls(
            rules,
            number=command.number,
            kind=command.kind,
            tasks=(TaskOutcome(site=s, status=TaskStatus.PENDING) for s in command.sites),
        )

    @property
    def tasks(self) -> dict[str, TaskOutcome]:
        """Each site's task (a copy), in site order."""
        return {site: self._tasks[site] for site in sorted(self._tasks)}

    @property
    def open_sites(self) -> tuple[str, ...]:
        return tuple(sorted(site for site, task in self._tasks.items() if task.is_open))

    def handle(self, event: RoundEvent) -> tuple[RoundCommand, ...]:
        """The commands that ``event`` calls for, in the order to carry them out (none for an event that
        changes nothing: a repeat, or one arriving after the round ended)."""
        if isinstance(event, TaskClosed):
            return self._task_closed(event)
        if self.phase is RoundPhase.ENDED:
            return ()
        match event:
            case DeadlinePassed():  # when concluding, the driver has not answered yet: ask again
                return self._close() if self._concludable else ()
            case Resumed():
                return self._close() if self.phase is RoundPhase.OPEN and not self.open_sites else ()
            case SecureSumDone(contributors=contributors):
                self._expect(Combination.SECURE, event)
                return self._secure_done(contributors) if self._concludable else ()
            case SecureSumFailed(reason=reason):
                self._expect(Combination.SECURE, event)
                if not self._concludable:
                    return ()
                return self._failed(reason, TaskStatus.TIMED_OUT, DROPPED_REASON)
            case SessionDone():
                self._expect(Combination.SESSION, event)
                if not self._concludable:
                    return ()
                closing = self._closing(frozenset(self._tasks), TaskStatus.FAILED, "")
                return (*closing, *self._count(tuple(sorted(self._tasks))))
            case SessionFailed(reason=reason):
                self._expect(Combination.SESSION, event)
                if not self._concludable:
                    return ()
                # a collective study's session may be retried (the scaling pre-step of a rounds study not)
                if (
                    self.rules.combination is Combination.SESSION
                    and self.number < self.rules.session_attempts
                ):
                    self.phase = RoundPhase.ENDED
                    closing = self._closing(frozenset(), TaskStatus.FAILED, reason)
                    retry = RetrySession(reason=reason, number=self.number + 1, sites=self.rules.train_sites)
                    return (*closing, retry)
                return self._failed(reason, TaskStatus.FAILED, reason)
            case Aggregated(at=at):
                return self._aggregated(at) if self.phase is RoundPhase.AGGREGATING else ()
            case AggregationFailed(reason=reason):
                return (self._fail(reason),)
        raise TypeError(f"not a round event: {event!r}")

    # --- rules -------------------------------------------------------------------------------------------

    @property
    def _concludable(self) -> bool:
        return self.phase in (RoundPhase.OPEN, RoundPhase.CONCLUDING)

    def _expect(self, combination: Combination, event: RoundEvent) -> None:
        if self.combination is not combination:
            raise ValueError(f"{type(event).__name__} in a {self.combination.value} round")

    def _task_closed(self, event: TaskClosed) -> tuple[RoundCommand, ...]:
        if event.status in _OPEN:
            raise ValueError(f"a closed task cannot be {event.status.value}")
        task = self._tasks.get(event.site)
        if task is None:
            raise ValueError(f"site {event.site!r} has no task in round {self.number}")
        if not task.is_open:
            return ()  # told twice (or closed by this machine already): nothing changes
        self._tasks[event.site] = TaskOutcome(site=event.site, status=event.status, reason=event.reason)
        if self.phase is not RoundPhase.OPEN:
            return ()
        if self.combination is Combination.SESSION and event.status is not TaskStatus.COMPLETED:
            return (AbandonSession(reason=f"{event.site}'s task ended ({event.reason})"),)
        return () if self.open_sites else self._close()

    def _close(self) -> tuple[RoundCommand, ...]:
        """The round closes now (every task closed, or the deadline passed)."""
        match self.combination:
            case Combination.SECURE:
                self.phase = RoundPhase.CONCLUDING
                return (ConcludeSecureSum(),)
            case Combination.SESSION:
                self.phase = RoundPhase.CONCLUDING
                return (ConcludeSession(),)
        # Late tasks close first: a result arriving from now on is refused, so what is aggregated is
        # exactly what was completed.
        closing = self._closing(frozenset(), TaskStatus.TIMED_OUT, DEADLINE_REASON)
        completed = tuple(s for s, t in sorted(self._tasks.items()) if t.status is TaskStatus.COMPLETED)
        return (*closing, *self._count(completed))

    def _closing(self, completed: frozenset[str], others: TaskStatus, reason: str) -> tuple[CloseTasks, ...]:
        """Close every open task: those of ``completed`` as completed, the others as ``others``."""
        outcomes = tuple(
            TaskOutcome(site=s, status=TaskStatus.COMPLETED)
            if s in completed
            else TaskOutcome(site=s, status=others, reason=reason)
            for s in self.open_sites
        )
        for outcome in outcomes:
            self._tasks[outcome.site] = outcome
        return (CloseTasks(outcomes=outcomes),) if outcomes else ()

    def _secure_done(self, contributors: tuple[str, ...]) -> tuple[RoundCommand, ...]:
        unknown = sorted(set(contributors) - set(self._tasks))
        if unknown or len(set(contributors)) != len(contributors):
            raise ValueError(
                f"contributors {list(contributors)} are not distinct sites of round {self.number}"
            )
        closing = self._closing(frozenset(contributors), TaskStatus.TIMED_OUT, DROPPED_REASON)
        return (*closing, *self._count(tuple(sorted(contributors))))

    def _failed(self, reason: str, others: TaskStatus, task_reason: str) -> tuple[RoundCommand, ...]:
        return (*self._closing(frozenset(), others, task_reason), self._fail(reason))

    def _count(self, contributors: tuple[str, ...]) -> tuple[RoundCommand, ...]:
        """Aggregate the round if it has the contributions it needs; fail the study otherwise."""
        plain = self.combination is Combination.PLAIN
        if self.kind is TaskKind.TRAIN:
            needed = self.rules.min_sites
        else:  # a secure evaluation needs a sum of someone; a plain one reports what it got
            needed = 0 if plain or self.kind is TaskKind.COLLECTIVE else 1
        if len(contributors) < needed:
            if plain:
                missing = "; ".join(
                    f"{t.site}: {t.status.value} ({t.reason})"
                    for t in self.tasks.values()
                    if t.status is not TaskStatus.COMPLETED
                )
                what = f"{len(contributors)} valid update(s), {needed} required ({missing})"
            else:
                what = f"{len(contributors)} contributor(s), {needed} required"
            return (self._fail(f"quorum not met: {what}"),)
        self.phase = RoundPhase.AGGREGATING
        self._contributors = contributors
        return (Aggregate(contributors=contributors),)

    def _aggregated(self, at: datetime) -> tuple[RoundCommand, ...]:
        self.phase = RoundPhase.ENDED
        if self.kind is TaskKind.TRAIN or self.number == SCALING_ROUND:
            number = self.number + 1
            kind = _kind_of(self.rules, number)
            sites = self.rules.train_sites if kind is TaskKind.TRAIN else self.rules.evaluation_sites
            deadline = at + timedelta(seconds=self.rules.round_deadline_s)
            return (OpenRound(number=number, kind=kind, sites=sites, deadline_at=deadline),)
        if self.kind is TaskKind.COLLECTIVE:
            return (FinishStudy(note=None),)
        if self.combination is Combination.PLAIN:
            missing = [
                f"{t.site}: {t.status.value} ({t.reason})"
                for t in self.tasks.values()
                if t.status is not TaskStatus.COMPLETED
            ]
            return (FinishStudy(note=f"no evaluation from {'; '.join(missing)}" if missing else None),)
        dropped = [site for site in sorted(self._tasks) if site not in self._contributors]
        return (FinishStudy(note=f"no evaluation from {', '.join(dropped)}" if dropped else None),)

    def _fail(self, reason: str) -> FailStudy:
        self.phase = RoundPhase.ENDED
        return FailStudy(round=self.number, reason=reason)
