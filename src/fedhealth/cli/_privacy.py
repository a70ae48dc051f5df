"""``fedhealth privacy ...`` for privacy officers, and ``fedhealth site budget ...`` for the site's ledger.

Thin: every command parses, calls :mod:`fedhealth.privacy`, and prints. Invalid input exits with code 2 and
one line on stderr, never a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import sqlalchemy as sa
import typer

from fedhealth.core import FedHealthError
from fedhealth.privacy import (
    PLD_EPSILON_CEILING,
    AccountantKind,
    BudgetLedger,
    BudgetStatement,
    DpParameterError,
    DpSgdRelease,
    calibrate_noise,
    epsilon,
    sqlite_engine,
)

privacy_app = typer.Typer(
    name="privacy",
    help="Differential-privacy accounting: epsilon of a DP-SGD run, noise for a target epsilon.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

budget_app = typer.Typer(
    name="budget",
    help="The site's privacy budget per dataset: set it, show the spend per study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=2)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; our own errors become a one-line message and exit code 2."""
    try:
        return action()
    except FedHealthError as exc:
        _fail(str(exc))


def _accountant(name: str) -> AccountantKind:
    try:
        return AccountantKind(name.lower())
    except ValueError:
        _fail(f"accountant must be one of {', '.join(k.value for k in AccountantKind)}, got {name!r}")


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
    accountant: Annotated[str, typer.Option("--accountant", help=_ACCOUNTANT_HELP)] = "pld",
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
    accountant: Annotated[str, typer.Option("--accountant", help=_ACCOUNTANT_HELP)] = "pld",
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
        _fail(f"site home {home} does not exist")
    return SiteHome(home).database_path


def _ledger(site_db: Path, *, create: bool) -> BudgetLedger:
    if not create and not site_db.is_file():
        _fail(f"site database {site_db} does not exist")
    engine = sqlite_engine(site_db)
    if create:
        BudgetLedger.create_schema(engine)
    elif not _has_ledger(engine):
        _fail(f"site database {site_db} holds no privacy budgets yet")
    return BudgetLedger(engine)


def _has_ledger(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("privacy_budget")


@budget_app.command("set")
def budget_set_command(
    dataset: Annotated[str, typer.Argument(help="The registered dataset's name.")],
    budget_epsilon: Annotated[float, typer.Option("--epsilon", help="Total epsilon allowed (> 0).")],
    delta: Annotated[float, typer.Option("--delta", help="Delta in (0, 1).")],
    site_db: SiteDb = None,
    home: SiteHomeOption = None,
) -> None:
    """Set (or change) the privacy budget of a dataset: every later task on it is checked against it."""
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
            f"  {study.study_id}: epsilon {study.epsilon:.4g} "
            f"({study.committed_tasks} committed, {study.reserved_tasks} reserved)"
        )


@budget_app.command("show")
def budget_show_command(
    dataset: Annotated[str | None, typer.Argument(help="One dataset; all when omitted.")] = None,
    site_db: SiteDb = None,
    home: SiteHomeOption = None,
) -> None:
    """Show each dataset's budget, total spend and spend per study (reservations count as spent)."""
    ledger = _ledger(_database(site_db, home), create=False)
    datasets = [dataset] if dataset is not None else [b.dataset for b in ledger.budgets()]
    if not datasets:
        typer.echo("no budgets set")
    for name in datasets:
        _print_statement(_guard(partial(ledger.statement, name)))
        for r in _guard(partial(ledger.pending, name)):
            typer.echo(
                f"  never settled: task {r.task_id} of {r.study_id}, reserved "
                f"{r.reserved_at:%Y-%m-%d %H:%M:%S} (the agent stopped after reserving; counted in full)"
            )
