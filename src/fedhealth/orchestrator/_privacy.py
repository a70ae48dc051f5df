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

import anyio
from fastapi import APIRouter

from fedhealth.orchestrator._hooks import NullObserver
from fedhealth.orchestrator._http import ApiError, Reader, Researcher, Svc
from fedhealth.orchestrator._privacy_plan import privacy_markdown, privacy_plan, privacy_report, study_privacy
from fedhealth.orchestrator._service import ExtensionContext, Registration
from fedhealth.protocol import StudyPrivacyInfo, StudySpec
from fedhealth.runtime import check_privacy

__all__ = [
    "PrivacyExtension",
    "PrivacyObserver",
    "privacy_markdown",
    "privacy_plan",
    "privacy_report",
    "study_privacy",
]


class PrivacyObserver(NullObserver):
    """Refuses a study whose privacy section the sites could not honour (422 with the reason)."""

    def check_study(self, spec: StudySpec, owner: str) -> None:
        check_privacy(spec)


class PrivacyExtension:
    """The orchestrator's privacy feature: the study check and the privacy routes."""

    def start(self, context: ExtensionContext) -> Registration:
        del context  # the checks and the views read the store per request: no state of its own
        return Registration(observer=PrivacyObserver())

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
