"""Differential privacy as the orchestrator reads it back: the plan a spec implies and each site's attested
spend, for the privacy routes and the study report's privacy section.

A pure read model of the store (no routes, no state), so the report (which the round engine writes) and the
privacy extension both use it without importing each other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

from fedhealth.core import InputError
from fedhealth.orchestrator._store import Store, TaskRow
from fedhealth.orchestrator._text import one_line
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
