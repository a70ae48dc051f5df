"""A site revoked while it waits inside a secure round (docs/security.md, "Sites"): revoking a site wakes
not only its waiting task poll but a waiting SecAgg+ stage poll too, which is refused then rather than
answered with the round's next message when its stage closes or its wait (25 s) ends.

Two of three sites run real agents; the third never comes, so the first stage stays open (its timeout is
60 s) and both agents wait in it. The revoked site's agent stops at once; the other is still waiting."""

from __future__ import annotations

import time

import pytest

from fedhealth.protocol import SecureAggregationSpec
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec

pytestmark = pytest.mark.e2e
SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_a_site_revoked_while_it_waits_in_a_secure_stage_is_refused_at_once(tmp_path):
    with LocalFederation(tmp_path) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
        for site in SITES[:2]:
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites(SITES[:2])
        spec = breast_spec(
            SITES,
            rounds=1,
            name="revoked-mid-round",
            min_sites=2,
            round_deadline_s=120,
            secure_aggregation=SecureAggregationSpec(stage_timeout_s=60.0, site_keys=fed.site_keys(SITES)),
        )
        fed.create_study(spec)
        log = fed.logs / "orchestrator.log"
        received = [f"advertise_keys message received from {site}" for site in SITES[:2]]
        _wait_for(
            lambda: all(line in log.read_text(errors="replace") for line in received),
            60,
            "the two agents never advertised their keys",
        )
        time.sleep(1)  # both now wait for the stage to close (hospital-c never comes)
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
