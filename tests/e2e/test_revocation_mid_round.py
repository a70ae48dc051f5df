"""A site revoked while it waits inside a secure round (docs/security.md, "Sites"): revoking a site wakes
not only its waiting task poll but a waiting SecAgg+ stage poll too, which is refused then rather than
answered with the round's next message when its stage closes or its wait (25 s) ends.

Two of three sites run real agents; the third never comes, so the first stage stays open (its timeout is
60 s) and both agents wait in it. The revoked site's agent stops at once; the other is still waiting.

Revoking the site that never came closes its task (``site_revoked``), so the stage closes then and the
study ends without it, well before the stage's timeout, its evaluation round included."""

from __future__ import annotations

import time

import pytest

from fedhealth.protocol import SecureAggregationSpec, StudySpec
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec

pytestmark = pytest.mark.e2e
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _federation(fed: LocalFederation, **secure: int) -> StudySpec:
    """Three sites enrolled, two with running agents; a one-round secure study over the three (min 2)."""
    fed.start_orchestrator()
    for site in SITES:
        fed.add_site(site)
    for site in SITES[:2]:
        fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
    fed.wait_for_sites(SITES[:2])
    return breast_spec(
        SITES,
        rounds=1,
        name="revoked-mid-round",
        min_sites=2,
        round_deadline_s=120,
        secure_aggregation=SecureAggregationSpec(
            stage_timeout_s=60.0, site_keys=fed.site_keys(SITES), **secure
        ),
    )


def _both_advertised(fed: LocalFederation) -> None:
    log = fed.logs / "orchestrator.log"
    received = [f"advertise_keys message received from {site}" for site in SITES[:2]]
    _wait_for(
        lambda: all(line in log.read_text(errors="replace") for line in received),
        60,
        "the two agents never advertised their keys",
    )
    time.sleep(1)  # both now wait for the stage to close (hospital-c never comes)


@pytest.mark.timeout(240)
def test_a_site_revoked_while_it_waits_in_a_secure_stage_is_refused_at_once(tmp_path):
    with LocalFederation(tmp_path) as fed:
        spec = _federation(fed)
        fed.create_study(spec)
        _both_advertised(fed)
        revoked_at = time.monotonic()
        assert fed.operator.revoke_site("hospital-a").status == "revoked"
        agent = fed.agents["hospital-a"]
        refused = "the revoked agent's stage poll was not refused at once"
        _wait_for(lambda: agent.poll() is not None, 10, refused)
        assert time.monotonic() - revoked_at < 10
        assert agent.returncode == 3
        assert "revoked" in (fed.logs / "agent-hospital-a.log").read_text(errors="replace")
        # the control: the site not revoked is still in the round, waiting for the stage to close
        assert fed.agents["hospital-b"].poll() is None


@pytest.mark.timeout(240)
def test_revoking_a_site_that_never_came_lets_the_secure_round_and_the_study_end_without_it_at_once(tmp_path):
    with LocalFederation(tmp_path) as fed:
        # no colluding site assumed: two of the three may unmask (by default three: 2t > n + n // 3)
        study = fed.create_study(_federation(fed, collusion=0))
        _both_advertised(fed)
        revoked_at = time.monotonic()
        assert fed.operator.revoke_site("hospital-c").status == "revoked"
        # the stage's timeout is 60 s and the round's deadline 120 s: before, the study waited for both
        info = fed.wait_for_study(study.study_id, timeout=50)
        took = time.monotonic() - revoked_at
        assert info.status == "completed", info.reason
        assert took < 40, f"the study ended {took:.0f} s after the revocation"
        assert info.completed_rounds == 1
        assert info.reason == "no evaluation from hospital-c"
        # its training task closed at the revocation, its evaluation task as that round opened
        log = (fed.logs / "orchestrator.log").read_text(errors="replace")
        assert log.count("closed: its site hospital-c is revoked") == 2
        # both sites that came are still running: nothing but the revoked site was dropped
        assert all(fed.agents[site].poll() is None for site in SITES[:2])
