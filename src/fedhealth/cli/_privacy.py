"""``fedhealth privacy ...`` for privacy officers, and ``fedhealth site budget ...`` for the site's ledger.

Thin: every command parses, calls :mod:`fedhealth.privacy`, and prints. Failures are one line
``error: ...`` on stderr, never a traceback: exit code 2 for invalid input (a parameter out of its range, a
target no noise reaches), 1 for a runtime failure (no such database, no budget for that dataset).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import sqlalchemy as sa
import typer

from fedhealth.cli._common import JsonOption, print_json, shown
from fedhealth.cli._errors import EXIT_RUNTIME, EXIT_USAGE, FedhealthGroup
from fedhealth.core import FedHealthError, InputError, is_valid_name
from fedhealth.privacy import (
    PLD_EPSILON_CEILING,
    AccountantKind,
    BudgetLedger,
    BudgetStatement,
    CalibrationError,
    DpParameterError,
    DpSgdRelease,
    calibrate_noise,
    check_delta,
    epsilon,
    sqlite_engine,
)

privacy_app = typer.Typer(
    name="privacy",
    help="Differential-privacy accounting: epsilon of a DP-SGD run, noise for a target epsilon.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=FedhealthGroup,
)

budget_app = typer.Typer(
    name="budget",
    help="The site's privacy budget per dataset: set it, show the spend per study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=FedhealthGroup,
)

T = TypeVar("T")

_ACCOUNTANT_HELP = "Accountant: pld (tight, default) or rdp."
SiteDb = Annotated[
    Path | None, typer.Option("--site-db", help="The site's SQLite database file (or give --home).")
]
SiteHomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", help="The site's home folder (`site enroll --home`); its ledger is HOME/site.sqlite."
    ),
]


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {shown(message)}", err=True)
    raise typer.Exit(code=code)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; invalid parameters exit 2, other fedhealth errors 1, each with one line."""
    try:
        return action()
    except (DpParameterError, CalibrationError, InputError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except FedHealthError as exc:
        _fail(str(exc), EXIT_RUNTIME)


class Accountant(StrEnum):  # AccountantKind's choices, as an option
    PLD = "pld"
    RDP = "rdp"


def _accountant(choice: Accountant) -> AccountantKind:
    return AccountantKind(choice.value)


def _release(sigma: float, sample_rate: float, steps: int) -> DpSgdRelease:
    if not (math.isfinite(sigma) and sigma > 0):
        raise DpParameterError(f"sigma (the noise multiplier) must be a positive number, got {sigma!r}")
    return DpSgdRelease(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)


@privacy_app.command("epsilon")
def epsilon_command(
    sigma: Annotated[float, typer.Option("--sigma", help="Noise multiplier (noise std / clip norm).")],
    sample_rate: Annotated[float, typer.Option("--sample-rate", help="Poisson sampling rate q in (0, 1].")],
    steps: Annotated[int, typer.Option("--steps", help="Number of noisy steps.")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta in (0, 1).")],
    accountant: Annotated[
        Accountant, typer.Option("--accountant", help=_ACCOUNTANT_HELP, case_sensitive=False)
    ] = Accountant.PLD,
) -> None:
    """Print the epsilon of DP-SGD (Poisson-sampled Gaussian) at the given delta."""
    kind = _accountant(accountant)
    release = _guard(lambda: _release(sigma, sample_rate, steps))
    eps = _guard(lambda: epsilon(release, delta=delta, accountant=kind))
    note = ""
    if kind is AccountantKind.PLD and eps > PLD_EPSILON_CEILING:
        note = f" [above {PLD_EPSILON_CEILING:g}, an RDP upper bound (integer orders) instead of PLD]"
    typer.echo(
        f"epsilon {eps:.6g} at delta {delta:g} ({kind.value} accountant; sigma {sigma:g}, "
        f"sample rate {sample_rate:g}, {steps} steps){note}"
    )


@privacy_app.command("calibrate")
def calibrate_command(
    target_epsilon: Annotated[float, typer.Option("--epsilon", help="Target epsilon (> 0).")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta in (0, 1).")],
    sample_rate: Annotated[float, typer.Option("--sample-rate", help="Poisson sampling rate q in (0, 1].")],
    steps: Annotated[int, typer.Option("--steps", help="Number of noisy steps.")],
    accountant: Annotated[
        Accountant, typer.Option("--accountant", help=_ACCOUNTANT_HELP, case_sensitive=False)
    ] = Accountant.PLD,
) -> None:
    """Print the smallest noise multiplier whose epsilon does not exceed the target."""
    kind = _accountant(accountant)
    sigma = _guard(lambda: calibrate_noise(target_epsilon, delta, sample_rate, steps, kind))
    reached = epsilon(
        DpSgdRelease(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps),
        delta=delta,
        accountant=kind,
    )
    typer.echo(
        f"noise multiplier {sigma:.6g} (epsilon {reached:.6g} <= {target_epsilon:g} at delta {delta:g}; "
        f"{kind.value} accountant, sample rate {sample_rate:g}, {steps} steps)"
    )


def _database(site_db: Path | None, home: Path | None) -> Path:
    """The ledger's database: ``--site-db`` itself, or the site home's ``site.sqlite`` (one of the two)."""
    if (site_db is None) == (home is None):
        _fail("give the site's home folder (--home) or its database file (--site-db), one of the two")
    if home is None:
        assert site_db is not None
        return site_db
    from fedhealth.agent import SiteHome

    if not home.is_dir():
        _fail(f"site home {home} does not exist", EXIT_RUNTIME)
    return SiteHome(home).database_path


def _ledger(site_db: Path, *, create: bool) -> BudgetLedger:
    if not create and not site_db.is_file():
        _fail(f"site database {site_db} does not exist", EXIT_RUNTIME)
    engine = sqlite_engine(site_db)
    if create:
        BudgetLedger.create_schema(engine)
    elif not _has_ledger(engine):
        _fail(f"site database {site_db} holds no privacy budgets yet", EXIT_RUNTIME)
    return BudgetLedger(engine)


def _has_ledger(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("privacy_budget")


def _check_budget(dataset: str, budget_epsilon: float, delta: float) -> None:
    """What ``BudgetLedger.set_budget`` refuses, refused before the database is opened or created."""
    if not is_valid_name(dataset):
        raise InputError(
            f"dataset name {dataset!r} is not valid: use 1 to 63 lowercase letters, digits, '_', '.' or '-'"
        )
    if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
        raise DpParameterError(f"budget epsilon must be a positive finite number, got {budget_epsilon!r}")
    check_delta(delta)


@budget_app.command("set")
def budget_set_command(
    dataset: Annotated[str, typer.Argument(help="The registered dataset's name.")],
    budget_epsilon: Annotated[float, typer.Option("--epsilon", help="Total epsilon allowed (> 0).")],
    delta: Annotated[float, typer.Option("--delta", help="Delta in (0, 1).")],
    site_db: SiteDb = None,
    home: SiteHomeOption = None,
) -> None:
    """Set (or change) the privacy budget of a dataset: every later task on it is checked against it."""
    # the values are checked before the database is opened: a bad one creates and changes nothing
    _guard(lambda: _check_budget(dataset, budget_epsilon, delta))
    ledger = _ledger(_database(site_db, home), create=True)
    budget = _guard(lambda: ledger.set_budget(dataset, budget_epsilon, delta))
    typer.echo(f"budget of {budget.dataset}: epsilon {budget.epsilon:g} at delta {budget.delta:g}")


def _print_statement(s: BudgetStatement) -> None:
    typer.echo(
        f"{s.dataset}: budget epsilon {s.budget_epsilon:g} at delta {s.delta:g}; spent {s.spent_epsilon:.4g} "
        f"(all studies composed, {s.accountant.value}); remaining {s.remaining_epsilon:.4g}"
    )
    if not s.studies:
        typer.echo("  no spend yet")
    for study in s.studies:
        typer.echo(
            f"  {shown(study.study_id)}: epsilon {study.epsilon:.4g} "
            f"({study.committed_tasks} committed, {study.reserved_tasks} reserved)"
        )


@budget_app.command("show")
def budget_show_command(
    dataset: Annotated[str | None, typer.Argument(help="One dataset; all when omitted.")] = None,
    site_db: SiteDb = None,
    home: SiteHomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show each dataset's budget, total spend and spend per study (reservations count as spent)."""
    ledger = _ledger(_database(site_db, home), create=False)
    datasets = [dataset] if dataset is not None else [b.dataset for b in ledger.budgets()]
    if as_json:
        print_json([_statement_json(_guard(partial(ledger.statement, n)), ledger, n) for n in datasets])
        return
    if not datasets:
        typer.echo("no budgets set")
    for name in datasets:
        _print_statement(_guard(partial(ledger.statement, name)))
        for r in _guard(partial(ledger.pending, name)):
            typer.echo(
                f"  never settled: task {shown(r.task_id)} of {shown(r.study_id)}, reserved "
                f"{r.reserved_at:%Y-%m-%d %H:%M:%S} (the agent stopped after reserving; counted in full)"
            )


def _statement_json(s: BudgetStatement, ledger: BudgetLedger, name: str) -> dict[str, object]:
    return {
        "dataset": s.dataset,
        "budget_epsilon": s.budget_epsilon,
        "delta": s.delta,
        "spent_epsilon": s.spent_epsilon,
        "remaining_epsilon": s.remaining_epsilon,
        "accountant": s.accountant.value,
        "studies": [
            {
                "study_id": st.study_id,
                "epsilon": st.epsilon,
                "committed_tasks": st.committed_tasks,
                "reserved_tasks": st.reserved_tasks,
            }
            for st in s.studies
        ],
        "never_settled": [
            {"task_id": r.task_id, "study_id": r.study_id, "reserved_at": r.reserved_at.isoformat()}
            for r in _guard(partial(ledger.pending, name))
        ],
    }
