"""The model card states the consent model each site applied (docs/governance.md, "Provenance and model
cards"): under opt-in a patient with no consent record is left out, under opt-out used, so a card saying
"only the patients whose recorded consent permitted" of an opt-out site told its reader something untrue.

Each site states the model it applied in its attestation (a fact of its policy, not of a patient); the
orchestrator keeps it in the version's provenance and the card prints it per site. Here: what the real
agent's gate attests under each policy, what provenance accepts and how a record made before the field
reads, and what the card says for opt-in, opt-out, mixed and unstated sites.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select

from agent.site_fixtures import PATIENTS, agent, approve, cohort, make_home, task
from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.core import InputError
from fedhealth.governance import (
    ConsentDecision,
    ConsentRecord,
    ModelProvenance,
    ProvenanceStore,
    model_card_markdown,
)
from fedhealth.governance._tables import model_versions
from fedhealth.protocol import ConsentBasis, StudySpec
from support import logreg_recipe

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


# --- what a site attests ------------------------------------------------------------------------------------


def _spec() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "consent-model",
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 1,
            "train_sites": ["hospital-a"],
        }
    )


@pytest.mark.parametrize(
    ("policy", "records", "expected", "used"),
    [
        ("", "permit all", ConsentBasis.OPT_IN, 28),  # auto: the registry holds records
        ("", "none", ConsentBasis.OPT_OUT, 28),  # auto: no record at all yet
        ('consent_model = "opt-in"\n', "permit half", ConsentBasis.OPT_IN, 14),
        ('consent_model = "opt-out"\n', "permit half", ConsentBasis.OPT_OUT, 28),
    ],
    ids=["auto-with-records", "auto-without-records", "opt-in", "opt-out"],
)
def test_a_site_attests_the_consent_model_its_gate_applied(tmp_path, policy, records, expected, used):
    """The attested model is the one the rows were chosen by: the control is the number of training rows
    used (70% of the patients kept), which differs between opt-in and opt-out for the same records."""
    home: SiteHome = make_home(tmp_path / "site")
    if policy:
        home.policy_path.write_text(policy)
    spec = _spec()
    approve(home, spec)
    permitted = {"permit all": PATIENTS, "permit half": PATIENTS[::2], "none": []}[records]
    if permitted:
        with SiteGovernance(home) as governance:
            governance.consent().add(
                [
                    ConsentRecord(patient_id=p, purpose="research", decision=ConsentDecision.PERMIT)
                    for p in permitted
                ]
            )
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec))
    assert client.failures == []
    [result] = client.results
    assert result.metrics.num_samples == used
    assert result.attestation is not None
    assert result.attestation.consent_model is expected


# --- provenance ---------------------------------------------------------------------------------------------


def _version(
    models: dict[str, str], sites: tuple[str, ...] = ("hospital-a", "hospital-b")
) -> ModelProvenance:
    return ModelProvenance(
        model_digest=_h("m1"),
        parent_digest=None,
        study_id="st-card",
        round=1,
        n_sites=len(sites),
        dataset_fingerprints={s: f"fp-{s}" for s in sites},
        consent_snapshots={s: _h(f"snap-{s}") for s in sites},
        spec_hash=_h("spec"),
        software_version="0.1.0",
        consent_models=models,
        created_at=T0,
    )


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"hospital-z": "opt-in"}, "did not contribute"),
        ({"hospital-a": "opt-maybe"}, "consent model must be one of"),
        ({"hospital-a": "Opt-In"}, "consent model must be one of"),
    ],
)
def test_provenance_refuses_a_consent_model_of_another_site_or_outside_the_two(models, message):
    with pytest.raises(InputError, match=message):
        _version(models)


class StoredConsentModels:
    backend: str

    def test_a_provenance_record_made_before_sites_stated_their_model_reads_and_records_the_same(
        self, engine: Engine
    ):
        """Records stored before the field have no ``consent_models`` in their body: they read as none stated,
        and recording the same version again is still the no-op it was (the body is unchanged)."""
        store = ProvenanceStore(engine)
        old = _version({})
        assert "consent_models" not in old.to_json()
        store.record(old)
        store.record(_version({}))  # the same again: no conflict
        assert store.get(old.model_digest) == old
        stated = _version({"hospital-a": "opt-in", "hospital-b": "opt-out"})
        other = ModelProvenance.from_json({**stated.to_json(), "model_digest": _h("m2")})
        store.record(other)
        assert store.get(_h("m2")).consent_models == {"hospital-a": "opt-in", "hospital-b": "opt-out"}
        with engine.connect() as conn:  # what the database holds: the canonical body, the models in it
            text = conn.execute(
                select(model_versions.c.body).where(model_versions.c.model_digest == _h("m2"))
            ).scalar_one()
        body = json.loads(text)
        assert body["consent_models"] == {"hospital-a": "opt-in", "hospital-b": "opt-out"}


class TestStoredConsentModelsOnSqlite(StoredConsentModels):
    backend = "sqlite"


@pytest.mark.postgres
class TestStoredConsentModelsOnPostgres(StoredConsentModels):
    backend = "postgres"


# --- the card -----------------------------------------------------------------------------------------------


def _card(models: dict[str, str]) -> tuple[dict[str, str], str]:
    card = model_card_markdown([_version(models)], intended_use="Tests.")
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("hospital-"):
            rows[cells[0]] = cells[2]
    consent = card.split("## Consent statement\n", 1)[1].split("\n## ", 1)[0]
    return rows, consent.strip()


def test_an_opt_out_sites_card_never_says_only_patients_with_a_permit_were_used():
    rows, consent = _card({"hospital-a": "opt-in", "hospital-b": "opt-out"})
    assert rows == {"hospital-a": "opt-in", "hospital-b": "opt-out"}
    lines = consent.splitlines()
    [opt_in] = [line for line in lines if line.startswith("- opt-in")]
    [opt_out] = [line for line in lines if line.startswith("- opt-out")]
    assert "(hospital-a)" in opt_in
    assert "recorded consent permitted" in opt_in
    assert "(hospital-b)" in opt_out
    assert "every patient except" in opt_out
    assert "no record: used" in opt_out
    assert not any("hospital-b" in line and "permitted" in line for line in lines)


def test_a_card_of_opt_in_sites_only_says_so_once():
    rows, consent = _card({"hospital-a": "opt-in", "hospital-b": "opt-in"})
    assert rows == {"hospital-a": "opt-in", "hospital-b": "opt-in"}
    assert consent.startswith(
        "At each site (opt-in everywhere), training used only the patients whose recorded"
    )
    assert "opt-out" not in consent


def test_a_card_with_a_site_that_stated_no_model_claims_no_rule_for_it():
    rows, consent = _card({"hospital-a": "opt-out"})
    assert rows == {"hospital-a": "opt-out", "hospital-b": "not stated"}
    [unstated] = [line for line in consent.splitlines() if line.startswith("- not stated")]
    assert "(hospital-b)" in unstated
    assert "permitted" not in unstated
    rows, consent = _card({})
    assert rows == {"hospital-a": "not stated", "hospital-b": "not stated"}
    assert "was not recorded for this version" in consent
    assert "recorded consent permitted" not in consent
