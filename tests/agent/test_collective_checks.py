"""The site's checks of a collective session against the approved spec, before any key is advertised or any
data read: the participants are exactly the spec's sites, every peer key hashes to the spec's fingerprint
(and its pin), no session arrives in clear, and the orchestrator's session config and the site's agree."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fedhealth.agent._collective import check_collective_session
from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import PeerPins
from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator._collective import session_config
from fedhealth.protocol import (
    CollectiveSessionInfo,
    FailureCode,
    RecipeSpec,
    SecureAggregationSpec,
    StudySpec,
    Task,
    TaskKind,
)

SITES = ["site-a", "site-b", "site-c", "site-d"]
ME = "site-b"
KEYS = {s: IdentityKey.generate() for s in [*SITES, "sybil"]}


def _spec(sites: list[str] = SITES, *, secure: bool = True) -> StudySpec:
    return StudySpec(
        name="collective",
        dataset="none",
        recipe=RecipeSpec(name="collective-probe", params={"size": 8}),
        rounds=1,
        train_sites=sites,
        secure_aggregation=SecureAggregationSpec(site_keys={s: KEYS[s].public().fingerprint for s in sites})
        if secure
        else None,
    )


def _task(spec: StudySpec, *, sites: list[str] | None = None, keys: dict[str, str] | None = None) -> Task:
    participants = sites if sites is not None else sorted(spec.train_sites)
    return Task(
        task_id="tk-1",
        study_id="st-1",
        round=1,
        kind=TaskKind.COLLECTIVE,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        spec=spec,
        collective=CollectiveSessionInfo(
            sites=participants,
            peer_keys=keys if keys is not None else {s: KEYS[s].public().raw.hex() for s in participants},
            attempt="attempt-1",
        ),
    )


def _check(task: Task, tmp_path) -> object:
    return check_collective_session(task, ME, KEYS[ME], PeerPins(tmp_path / "peers.json"))


def test_an_honest_session_passes_and_the_site_derives_the_orchestrators_configuration(tmp_path):
    spec = _spec()
    checked = _check(_task(spec), tmp_path)
    honest = session_config(spec, study_id="st-1", number=1, attempt="attempt-1", sites=SITES)
    assert checked.config == honest  # type: ignore[attr-defined]
    assert checked.config.digest() == honest.digest()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "sites",
    [
        ["site-a", "site-b", "site-c"],  # one left out: a sum over a subset the spec did not approve
        [*SITES, "sybil"],  # one added
        ["site-b", "site-a", "site-c", "site-d"],  # another leader
    ],
)
def test_a_session_over_other_participants_is_refused(tmp_path, sites):
    with pytest.raises(TaskRefused) as refused:
        _check(_task(_spec(), sites=sites), tmp_path)
    assert refused.value.code == FailureCode.SECURE_ROUND_MISMATCH.value
    assert "participant list" in refused.value.reason


def test_a_substituted_peer_key_is_refused(tmp_path):
    keys = {s: KEYS[s].public().raw.hex() for s in SITES}
    keys["site-c"] = KEYS["sybil"].public().raw.hex()
    with pytest.raises(TaskRefused) as refused:
        _check(_task(_spec(), keys=keys), tmp_path)
    assert refused.value.code == FailureCode.PEER_KEY_MISMATCH.value


def test_a_collective_task_without_its_session_or_without_bound_keys_is_refused(tmp_path):
    spec = _spec()
    bare = _task(spec).model_copy(update={"collective": None})
    with pytest.raises(TaskRefused) as refused:
        _check(bare, tmp_path)
    assert refused.value.code == FailureCode.SECURE_ROUND_MISSING.value
    with pytest.raises(TaskRefused) as refused:
        _check(_task(_spec(secure=False)), tmp_path)
    assert refused.value.code == FailureCode.SECURE_ROUND_MISMATCH.value


def test_a_spec_of_two_sites_cannot_hold_a_session(tmp_path):
    spec = _spec(["site-a", "site-b"])
    with pytest.raises(TaskRefused, match="existence"):
        _check(_task(spec), tmp_path)
