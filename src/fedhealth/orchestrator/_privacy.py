"""Differential privacy at the orchestrator: refuse a study the sites could not honour, plan the noise for a
target epsilon, and show each site's spend.

The orchestrator holds no budget: each site's ledger is the authority on its data, and the orchestrator
only repeats what the sites attested (:class:`fedhealth.protocol.PrivacySpend` in every task's attestation)
beside what the study's spec plans. Both sides compute the plan with the same code
(:mod:`fedhealth.runtime`'s privacy functions), so a site's charge per round is predictable here.

- ``check_study``: the spec's privacy section is checked (:func:`fedhealth.runtime.check_privacy`): each
  mode only for a recipe that declares it (DP-SGD: logreg with plain SGD), a target epsilon that some noise
  multiplier reaches (the calibration runs here, for every training site), site-distributed noise only
  under secure aggregation with unweighted sums. A refusal is a 422 naming the problem.
- ``POST /api/v1/privacy/plan`` (researcher): the noise and the per-site epsilon a spec would get, without
  creating the study.
- ``GET /api/v1/studies/{id}/privacy`` (reader): per training site, the plan and the latest figures its
  ledger attested (the study's epsilon, the dataset's total over all studies, the budget, what remains) and
  its latest refusal; the same section is in the study report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import APIRouter

from fedhealth.core import InputError
from fedhealth.orchestrator._app import ApiError, OrchestratorSettings, Reader, Researcher, Svc
from fedhealth.orchestrator._blobs import BlobStore
from fedhealth.orchestrator._hooks import NullObserver, StudyObserver
from fedhealth.orchestrator._report import one_line
from fedhealth.orchestrator._store import Store, TaskRow
from fedhealth.protocol import (
    DpMode,
    PrivacySpend,
    SitePrivacyInfo,
    StudyPrivacyInfo,
    StudySpec,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    check_privacy,
    noise_multiplier,
    planned_epsilon,
    sample_rate,
    site_level_epsilon,
)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@functools.lru_cache(maxsize=256)
def _plan(spec_json: str) -> StudyPrivacyInfo:
    spec = StudySpec.model_validate_json(spec_json)
    privacy = spec.privacy
    assert privacy is not None
    record = privacy.mode is DpMode.RECORD
    sites = [
        SitePrivacyInfo(
            site=site,
            noise_multiplier=noise_multiplier(spec, site if record else None),
            sample_rate=sample_rate(spec, site) if record else None,
            planned_epsilon=_finite(planned_epsilon(spec, site)),
        )
        for site in sorted(spec.train_sites)
    ]
    return StudyPrivacyInfo(
        study_id=None,
        mode=privacy.mode,
        delta=privacy.delta,
        accountant=privacy.accountant,
        target_epsilon=privacy.target_epsilon,
        max_grad_norm=privacy.max_grad_norm,
        rounds=spec.rounds,
        steps_per_round=privacy.steps_per_round,
        site_level_epsilon=_finite(site_level_epsilon(spec)),
        sites=sites,
    )


def privacy_plan(spec: StudySpec) -> StudyPrivacyInfo:
    """What ``spec``'s privacy section means for each training site (calibrated noise, planned epsilon).

    Raises :class:`InputError` if the spec has no privacy section or one the services cannot honour.
    Accounting takes a fraction of a second per site; the answer is cached per spec.
    """
    if spec.privacy is None:
        raise InputError("the study has no privacy section")
    check_privacy(spec)
    return _plan(spec.model_dump_json())


def _refusal(task: TaskRow) -> str | None:
    return task.reason if task.status is TaskStatus.FAILED else None


def study_privacy(store: Store, study_id: str) -> StudyPrivacyInfo | None:
    """The study's plan and each training site's latest attested spend; None without differential privacy."""
    spec = store.spec(study_id)
    if spec.privacy is None:
        return None
    plan = _plan(spec.model_dump_json())
    latest: dict[str, PrivacySpend] = {}
    charged: dict[str, int] = {}
    refusal: dict[str, str | None] = {}
    for task in store.tasks_of_study(study_id):  # oldest first: later attestations replace earlier ones
        spend = task.attestation.privacy if task.attestation is not None else None
        if spend is not None:
            latest[task.site] = spend
            if spend.task_epsilon is not None and task.kind is TaskKind.TRAIN:
                charged[task.site] = charged.get(task.site, 0) + 1
        if task.status is TaskStatus.FAILED:
            refusal[task.site] = _refusal(task)
    sites = []
    for info in plan.sites:
        spend = latest.get(info.site)
        sites.append(
            info.model_copy(
                update={
                    "spent": spend,
                    "remaining_epsilon": (
                        max(0.0, spend.budget_epsilon - spend.total_epsilon) if spend is not None else None
                    ),
                    "tasks_charged": charged.get(info.site, 0),
                    "refusal": refusal.get(info.site),
                }
            )
        )
    return plan.model_copy(update={"study_id": study_id, "sites": sites})


def privacy_report(store: Store, study_id: str) -> dict[str, Any] | None:
    """The report's privacy section (JSON), or None for a study without differential privacy."""
    info = study_privacy(store, study_id)
    return info.model_dump(mode="json") if info is not None else None


def _eps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def privacy_markdown(section: Mapping[str, Any]) -> list[str]:
    """The report's privacy section as Markdown lines."""
    target = section.get("target_epsilon")
    lines = [
        "## Differential privacy",
        "",
        f"- Mode: `{section['mode']}`; delta {section['delta']:g}; accountant `{section['accountant']}`; "
        f"clip {section['max_grad_norm']:g}"
        + (f"; target epsilon {target:g} (noise calibrated)" if target is not None else ""),
    ]
    if section.get("site_level_epsilon") is not None:
        lines.append(f"- Site-level epsilon of the whole study: {section['site_level_epsilon']:.4g}")
    lines += [
        "- Epsilons are record level (patients), accounted by each site's ledger at its budget's delta;"
        " 'planned' is the whole study at the spec's delta.",
        "",
        "| site | noise | planned eps | study eps (ledger) | dataset total | budget | remaining | charged"
        " tasks | refusal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in section["sites"]:
        spent = s.get("spent") or {}
        lines.append(
            f"| {s['site']} | {s['noise_multiplier']:.4g} | {_eps(s.get('planned_epsilon'))} "
            f"| {_eps(spent.get('study_epsilon'))} | {_eps(spent.get('total_epsilon'))} "
            f"| {_eps(spent.get('budget_epsilon'))} | {_eps(s.get('remaining_epsilon'))} "
            f"| {s.get('tasks_charged', 0)} | {one_line(s.get('refusal') or '')} |"
        )
    return lines


class PrivacyObserver(NullObserver):
    """Refuses a study whose privacy section the sites could not honour (422 with the reason)."""

    def check_study(self, spec: StudySpec, owner: str) -> None:
        check_privacy(spec)


class PrivacyExtension:
    """The orchestrator's privacy feature: the study check and the privacy routes."""

    def observer(
        self, store: Store, blobs: BlobStore, settings: OrchestratorSettings
    ) -> StudyObserver | None:
        del store, blobs, settings
        return PrivacyObserver()

    def routers(self) -> list[APIRouter]:
        router = APIRouter(tags=["privacy"])

        @router.get("/api/v1/studies/{study_id}/privacy", response_model=StudyPrivacyInfo)
        async def get_study_privacy(svc: Svc, _: Reader, study_id: str) -> StudyPrivacyInfo:
            """Each training site's privacy plan and its ledger's latest figures for this study."""
            info = await anyio.to_thread.run_sync(study_privacy, svc.store, study_id)
            if info is None:
                raise ApiError(404, f"study {study_id} has no differential privacy")
            return info

        @router.post("/api/v1/privacy/plan", response_model=StudyPrivacyInfo)
        async def plan_privacy(svc: Svc, _: Researcher, body: StudySpec) -> StudyPrivacyInfo:
            """The calibrated noise and per-site epsilon a study spec would get (nothing is created)."""
            del svc
            return await anyio.to_thread.run_sync(privacy_plan, body)

        return [router]
