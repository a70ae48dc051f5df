"""A malicious site against the orchestrator's figures and reports (not the model: see
tests/runtime/test_poisoning_bounds.py): what it sends besides its update (its metrics, attestation and
readiness report) must either be refused at receipt, naming the field, or leave every round figure finite,
the study report strict JSON and one table row per site, the round's provenance recorded, and the operator's
`site readiness` listing one line per site.

Handlers are called as functions of a real OrchestratorService (as in test_handlers.py), on SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fedhealth.orchestrator import (
    OrchestratorService,
)
from fedhealth.orchestrator._governance import GovernanceObserver
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._report import build_report, report_markdown
from fedhealth.orchestrator._routes_sites import accept_approval, pending_specs
from fedhealth.orchestrator._routes_studies import submit_study
from fedhealth.orchestrator._routes_tasks import accept_result, poll_task
from fedhealth.protocol import (
    ApprovalReport,
    ApprovalState,
    PrivacySpend,
    ResultManifest,
    Role,
    SiteAttestation,
    SiteMetrics,
    SiteReadiness,
    StudySpec,
    Task,
)
from fedhealth.runtime import encode_update, param_specs
from support import operator_principal, running_service, synthetic_recipe

SITES = ["site-a", "site-b"]
HONEST, MALICIOUS = SITES


ADMIN = operator_principal("admin", Role.ADMIN)
RESEARCHER = operator_principal("alice", Role.RESEARCHER)


def _spec() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "poisoned-figures",
            "owner": "alice",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": SITES,
            "min_sites": 1,
            "round_deadline_s": 600.0,
            "seed": 3,
        }
    )


async def _first_tasks(svc: OrchestratorService) -> tuple[str, dict[str, Task]]:
    info = await submit_study(svc, RESEARCHER, _spec())
    assert info.spec_hash is not None
    for site in SITES:
        assert [p.study_id for p in pending_specs(svc, site).specs] == [info.study_id]
        await accept_approval(
            svc, site, ApprovalReport(spec_hash=info.spec_hash, state=ApprovalState.APPROVED)
        )
    tasks = {}
    for site in SITES:
        polled = await poll_task(svc, site, wait=0)
        assert polled.task is not None
        tasks[site] = polled.task
    return info.study_id, tasks


def _run(tmp_path: Path, body: Callable[[OrchestratorService], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_service(tmp_path, SITES) as svc:
            await body(svc)

    asyncio.run(main())


def _update(task: Task, metrics: dict[str, Any], attestation: dict[str, Any] | None = None) -> bytes:
    """An update whose manifest holds exactly what a hostile site chose: built without the site-side
    validation (``model_construct``), so the orchestrator's receipt is what is tested."""
    delta = {s.name: np.full(s.shape, 0.01, dtype=np.float32) for s in param_specs(task.recipe)}
    manifest = ResultManifest.model_construct(
        task_id=task.task_id,
        metrics=SiteMetrics.model_construct(**({"num_eval_samples": 0, "duration_s": 0.0} | metrics)),
        attestation=SiteAttestation.model_construct(**attestation) if attestation is not None else None,
    )
    return encode_update(delta, manifest)


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _said(error: ApiError) -> str:
    return f"{error.error}: {error.detail}"


def _strict_json(value: Any) -> str:
    return json.dumps(value, allow_nan=False)  # what a JSON parser other than Python's accepts


# --- metrics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [1e308, -1e308, -1.0],
    ids=["overflows-the-weighted-sum", "cancels-to-nan", "negative"],
)
def test_a_training_loss_out_of_range_is_refused_and_the_rounds_figures_stay_finite(
    tmp_path: Path, loss: float
) -> None:
    """1e308 from a site claiming 10^9 samples made the round's sample-weighted train loss inf (-1e308 beside
    an honest 1e308: NaN); it went into the round metrics, the model version, the report (`nan` in the
    Markdown table, `NaN` in the JSON file, which strict parsers refuse) and the API (null)."""

    async def body(svc: OrchestratorService) -> None:
        study_id, tasks = await _first_tasks(svc)
        honest = {"num_samples": 10, "train_loss": 0.5}
        if loss == -1e308:  # an "honest-looking" huge figure the hostile one cancels out
            honest = {"num_samples": 10**9, "train_loss": 1e308}
        with contextlib.suppress(ApiError):  # refused as well: fine, the round goes on with whoever remains
            await accept_result(svc, HONEST, tasks[HONEST].task_id, _update(tasks[HONEST], honest))
        with pytest.raises(ApiError) as refused:
            await accept_result(
                svc,
                MALICIOUS,
                tasks[MALICIOUS].task_id,
                _update(tasks[MALICIOUS], {"num_samples": 10**9, "train_loss": loss}),
            )
        assert refused.value.status == 422
        assert "train_loss" in _said(refused.value)
        report = build_report(svc.store, study_id)
        assert _all_finite(report), report["rounds"]
        _strict_json(report)
        markdown = report_markdown(report).lower()
        assert "nan" not in markdown
        assert "inf |" not in markdown

    _run(tmp_path, body)


@pytest.mark.parametrize("field", ["train_loss", "eval_loss"])
@pytest.mark.parametrize("value", [1e308, 1e101, -1.0, -1e-320])
def test_each_loss_is_bounded_at_receipt_naming_the_field(field: str, value: float) -> None:
    """An evaluation's metrics are parsed from JSON by this model (a 422 naming the field); sums of losses
    of up to 10^9 samples each must stay far from float64's overflow."""
    with pytest.raises(ValidationError) as refused:
        SiteMetrics.model_validate({"num_samples": 10**9, field: value})
    assert field in str(refused.value)
    # honest figures, including -0.0 and subnormals, and a diverged but finite loss, still pass
    for fine in (0.0, -0.0, 5e-324, 0.693, 1e6):
        SiteMetrics.model_validate({"num_samples": 10**9, field: fine})


# --- attestations ----------------------------------------------------------------------------------------


def _governance(svc: OrchestratorService) -> GovernanceObserver:
    return next(o for o in svc.engine.observers if isinstance(o, GovernanceObserver))


@pytest.mark.parametrize(
    "attestation",
    [
        {"consent_snapshot": "not-a-hash"},
        {"dataset_fingerprint": "a|b\n| x | y |\n`z`"},
        {"dataset_fingerprint": "f" * 100_000},
    ],
    ids=["consent-snapshot-not-a-hash", "fingerprint-breaks-the-model-card-table", "fingerprint-100-kb"],
)
def test_an_attestation_that_is_not_a_digest_is_refused_and_the_rounds_provenance_is_recorded(
    tmp_path: Path, attestation: dict[str, str]
) -> None:
    """Both are a keyed commitment (64 hex digits) from an honest agent. A consent snapshot of other text made
    the governance observer fail at the round's close: no provenance for the round's model (so no model card,
    no lineage for anyone), no model-release audit entry, no round commitment of the sites' audit heads. A
    fingerprint with `|`, a newline or a backtick broke the model card's table; one of 100 kB went into
    every provenance answer."""

    async def body(svc: OrchestratorService) -> None:
        _, tasks = await _first_tasks(svc)
        await accept_result(
            svc, HONEST, tasks[HONEST].task_id, _update(tasks[HONEST], {"num_samples": 10, "train_loss": 0.5})
        )
        hostile = _update(tasks[MALICIOUS], {"num_samples": 10, "train_loss": 0.5}, attestation)
        with pytest.raises(ApiError) as refused:
            await accept_result(svc, MALICIOUS, tasks[MALICIOUS].task_id, hostile)
        assert refused.value.status == 422
        assert next(iter(attestation)) in _said(refused.value)
        study = svc.store.get_study(tasks[HONEST].study_id)
        assert study.completed_rounds == 1
        provenance = _governance(svc).provenance
        assert study.model_digest is not None
        assert provenance.get(study.model_digest).sites == [HONEST]

    _run(tmp_path, body)


def test_an_attested_privacy_dataset_is_a_name_not_free_text() -> None:
    """It becomes a Prometheus label and a dashboard cell: an agent states the spec's dataset (a Name); a
    megabyte of text, a newline or a quote is refused, naming the field."""
    base = {"delta": 1e-5, "study_epsilon": 0.1, "total_epsilon": 0.1, "budget_epsilon": 5.0}
    PrivacySpend.model_validate({"dataset": "breast-cancer", **base})
    for dataset in ("x" * (1 << 20), 'a"} 1\nfedhealth_evil 1', "Breast Cancer"):
        with pytest.raises(ValidationError, match="dataset"):
            PrivacySpend.model_validate({"dataset": dataset, **base})


# --- readiness -------------------------------------------------------------------------------------------


def _readiness(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "site": MALICIOUS,
        "checked_at": "2026-01-01T00:00:00Z",
        "software_version": "0.1.0",
        "protocol_version": 1,
        "ready": False,
        "checks": [],
    }
    return body | overrides


@pytest.mark.parametrize(
    "version",
    ["0.1\nsite-a\tNOT READY (tls)", "0.1\x1b[2J\x1b[H", "0.1\tready", "0.1\u2028x", ""],
    ids=["newline-forges-a-line", "terminal-escape", "tab-forges-a-column", "line-separator", "empty"],
)
def test_a_readiness_software_version_must_look_like_a_version(version: str) -> None:
    """`fedhealth site readiness` prints one tab-separated line per site with the version as sent: a newline
    let a site print a forged line about another site ("site-a NOT READY"), an escape sequence cleared the
    operator's terminal. Refused at receipt, naming the field; real versions pass."""
    with pytest.raises(ValidationError, match="software_version"):
        SiteReadiness.model_validate(_readiness(software_version=version))
    for fine in ("0.1.0", "1.2.3.dev4+g1a2b3c.d20260101", "2.0.0rc1", "1.0-local_build"):
        SiteReadiness.model_validate(_readiness(software_version=fine))
