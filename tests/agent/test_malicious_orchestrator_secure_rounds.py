"""A lying orchestrator against a site's secure rounds, beyond the set-up checks of
``test_secure_round_checks.py`` (docs/secure-aggregation.md, "What the stewards approve, and what each site
checks"; docs/privacy.md, site-distributed noise):

- a key substitution smuggled in through a spec the steward never approved pins nothing;
- a forged round of a DP study is refused before the dataset is opened, and its budget reservation is given
  back (nothing was computed on the rows);
- a round claiming fewer participants cannot shrink the noise: a site accepts no round over fewer sites than
  the spec's threshold, and its own noise share follows the spec whatever the round names."""

from __future__ import annotations

import numpy as np
import pytest
from site_fixtures import agent, approve, make_home, task

from fedhealth.agent._pipeline import TaskRefused
from fedhealth.agent._secure import PeerPins, check_secure_round
from fedhealth.crypto import IdentityKey
from fedhealth.data import open_dataset
from fedhealth.learning import logreg_init
from fedhealth.orchestrator._secure import round_config
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import (
    FailureCode,
    PrivacySpec,
    SecureAggregationSpec,
    SecureRoundInfo,
    StudySpec,
    Task,
    TaskKind,
    secure_round_plan,
)
from fedhealth.runtime import train_on_site
from fedhealth.runtime._privacy import fewest_contributors, site_update_dp
from support import logreg_recipe

ME = "hospital-a"
OTHERS = ["hospital-b", "hospital-c"]
DELTA = 1e-5


def secure_spec(home, keys: dict[str, IdentityKey], *, name: str = "secure", **privacy: object) -> StudySpec:
    fingerprints = {ME: home.identity().public().fingerprint}
    fingerprints.update({s: k.public().fingerprint for s, k in keys.items()})
    fields: dict[str, object] = {
        "name": name,
        "dataset": "cohort",
        "recipe": logreg_recipe(2, learning_rate=0.5),
        "rounds": 2,
        "train_sites": [ME, *keys],
        "min_sites": 2,
        "secure_aggregation": SecureAggregationSpec(site_keys=fingerprints),
    }
    if privacy:
        fields["privacy"] = PrivacySpec.model_validate(privacy)
    return StudySpec.model_validate(fields)


def with_round(t: Task, spec: StudySpec, peer_keys: dict[str, str], **config: object) -> Task:
    """``t`` with the secure round an honest orchestrator would send, then ``config`` changed."""
    sites = list(secure_round_plan(spec, t.kind).sites)
    honest = round_config(spec, t.kind, study_id=t.study_id, number=t.round, attempt="a1", sites=sites)
    info = SecureRoundInfo(config={**honest.to_json(), **config}, peer_keys=peer_keys, attempt="a1")
    return t.model_copy(update={"secure_round": info})


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "site", ME)


@pytest.fixture
def peers():
    return {s: IdentityKey.generate() for s in OTHERS}


def test_a_key_substituted_through_a_spec_the_steward_never_approved_is_never_pinned(home, peers, tmp_path):
    approved = secure_spec(home, peers)
    approve(home, approved)
    sybil = IdentityKey.generate()
    # the same study, but the spec now vouches for the orchestrator's own key in hospital-b's place
    forged = secure_spec(home, {**peers, "hospital-b": sybil})
    keys = {ME: home.identity().public().raw.hex(), "hospital-b": sybil.public().raw.hex()}
    keys["hospital-c"] = peers["hospital-c"].public().raw.hex()
    site, client = agent(home, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    site.handle(with_round(task(forged), forged, keys))
    assert [f.code for f in client.failures] == [FailureCode.STUDY_APPROVAL]
    assert not (home.root / "peers.json").exists()
    assert site._pins.fingerprints() == {}
    # so the approved spec's round, with the real keys, still passes and pins the real key
    real = {**keys, "hospital-b": peers["hospital-b"].public().raw.hex()}
    assert check_secure_round(with_round(task(approved), approved, real), ME, home.identity(), site._pins)
    assert site._pins.fingerprints()["hospital-b"] == peers["hospital-b"].public().fingerprint


@pytest.mark.parametrize(
    "forgery",
    [
        {"threshold": 2, "collusion": 0},  # fewer sites would unmask (2t > n + c still holds for 3 sites)
        {"protocol_version": "fedhealth-secagg+/1"},  # the protocol without the consistency round
        {"round": 2},  # another round's set-up
    ],
)
def test_a_forged_round_of_a_dp_study_is_refused_before_the_data_and_gives_its_reservation_back(
    home, peers, tmp_path, forgery
):
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    ledger = BudgetLedger(engine)
    ledger.set_budget("cohort", 20.0, DELTA)
    spec = secure_spec(
        home,
        peers,
        delta=DELTA,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.2,
        steps_per_round=3,
    )
    approve(home, spec)
    keys = {ME: home.identity().public().raw.hex()}
    keys.update({s: k.public().raw.hex() for s, k in peers.items()})
    # the dataset file does not exist: a site that read data first would answer dataset_unavailable
    site, client = agent(home, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    site.handle(with_round(task(spec), spec, keys, **forgery))
    assert [f.code for f in client.failures] == [FailureCode.SECURE_ROUND_MISMATCH]
    assert client.results == []
    assert client.evaluations == []
    assert ledger.pending("cohort") == []
    statement = ledger.statement("cohort")
    assert statement.spent_epsilon == 0.0
    assert [s.reserved_tasks for s in statement.studies] in ([], [0])
    # the honest round of the same task passes the same check (the refusal above was the forgery's)
    assert check_secure_round(with_round(task(spec), spec, keys), ME, home.identity(), PeerPins(None))


SIX = ["site-a", "site-b", "site-c", "site-d", "site-e", "site-f"]
SIX_KEYS = {s: IdentityKey.generate() for s in SIX}
URI = "builtin://breast-cancer/0?sites=4&seed=0"


def distributed_spec() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "distributed",
            "dataset": "bc",
            "recipe": logreg_recipe(30, learning_rate=0.5),
            "rounds": 3,
            "train_sites": SIX,
            "min_sites": 4,
            "seed": 5,
            "secure_aggregation": SecureAggregationSpec(
                site_keys={s: k.public().fingerprint for s, k in SIX_KEYS.items()}, update_clip=100.0
            ),
            "privacy": PrivacySpec.model_validate(
                {"mode": "site-distributed", "noise_multiplier": 2.0, "max_grad_norm": 1.0, "delta": DELTA}
            ),
        }
    )


def test_a_round_claiming_fewer_participants_cannot_shrink_the_noise_of_the_sum(monkeypatch):
    spec = distributed_spec()
    dp = site_update_dp(spec)
    sigma_c = dp.noise_multiplier * dp.clip_norm
    threshold = secure_round_plan(spec, TaskKind.TRAIN).threshold
    assert fewest_contributors(spec) == 4
    assert threshold == 5
    me, identity = SIX[0], SIX_KEYS[SIX[0]]
    base = task(spec).model_copy(update={"dataset": "bc"})
    accepted, refused = [], []
    for k in range(1, len(SIX) + 1):
        sites = SIX[:k]
        forged = with_round(base, spec, {s: SIX_KEYS[s].public().raw.hex() for s in sites}, sites=sites)
        try:
            check_secure_round(forged, me, identity, PeerPins(None))
        except TaskRefused as refusal:
            refused.append(refusal.code)
            continue
        accepted.append((k, forged))
    assert refused == [FailureCode.SECURE_ROUND_MISMATCH.value] * 4
    assert [k for k, _ in accepted] == [5, 6]  # never a round over fewer sites than the threshold
    for k, _ in accepted:
        # k shares of variance (sigma C)^2 / m, m fixed by the spec: the sum carries at least the noise
        # the ledger accounted
        assert k * dp.site_noise_std**2 >= sigma_c**2 * (1 - 1e-12)
    # and the share a site adds does not depend on how many sites the round names (same task stream)
    monkeypatch.setenv("FEDHEALTH_REPRODUCIBLE_NOISE", "1")
    data, params = open_dataset(URI), logreg_init(30, 0)
    shares = [train_on_site(t, me, params, data).delta for _, t in accepted]
    for name in shares[0]:
        np.testing.assert_array_equal(shares[0][name], shares[1][name])
    assert dp.site_noise_std == pytest.approx(sigma_c / np.sqrt(fewest_contributors(spec)))
