"""Provenance: lineage, withdrawal flags on exactly the affected versions, PROV-JSON and model cards."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fedhealth.core import ConflictError, InputError, NotFoundError
from fedhealth.governance import (
    PROV_NAMESPACE,
    AuditEventType,
    FlagReason,
    ModelProvenance,
    ProvenanceStore,
    WithdrawalFlag,
    model_card_markdown,
    to_prov_json,
)
from fedhealth.privacy import MembershipReport

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SPEC = hashlib.sha256(b"spec").hexdigest()


def h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def version(
    name: str,
    parent: str | None,
    round: int,
    snapshots: dict[str, str],
    *,
    study: str = "st-sepsis",
    eps: dict[str, float] | None = None,
) -> ModelProvenance:
    return ModelProvenance(
        model_digest=h(name),
        parent_digest=h(parent) if parent else None,
        study_id=study,
        round=round,
        n_sites=len(snapshots),
        dataset_fingerprints={site: f"fp-{site}" for site in snapshots},
        consent_snapshots={site: h(s) for site, s in snapshots.items()},
        spec_hash=SPEC,
        software_version="0.1.0",
        dp_params={"mechanism": "gaussian", "delta": 1e-5, "noise_multiplier": 1.1, "level": "record"},
        epsilon_spent=eps if eps is not None else {site: 0.5 * round for site in snapshots},
        created_at=T0 + timedelta(minutes=round),
    )


def lineage_fixture() -> list[ModelProvenance]:
    # m0 (initial) -> m1 -> m2 -> m3, plus m2b branching from m1; another study's o1 from its own root o0
    return [
        version("m0", None, 0, {}),
        version("m1", "m0", 1, {"a": "S1", "b": "T1"}),
        version("m2", "m1", 2, {"a": "S2", "b": "T1"}),
        version("m3", "m2", 3, {"a": "S3", "b": "T1"}),
        version("m2b", "m1", 2, {"a": "S3", "b": "S1"}),
        version("o0", None, 0, {}, study="st-other"),
        version("o1", "o0", 1, {"a": "S4"}, study="st-other"),
    ]


class ProvenanceContract:
    backend: str

    @pytest.fixture
    def store(self, engine, site_log) -> ProvenanceStore:
        store = ProvenanceStore(engine, audit_log=site_log)
        for p in lineage_fixture():
            store.record(p)
        return store

    def test_a_recorded_version_reads_back_equal(self, store):
        for p in lineage_fixture():
            assert store.get(p.model_digest) == p

    def test_lineage_walks_parents_back_to_the_root(self, store):
        assert [p.model_digest for p in store.lineage(h("m3"))] == [h("m3"), h("m2"), h("m1"), h("m0")]
        assert [p.model_digest for p in store.lineage(h("m2b"))] == [h("m2b"), h("m1"), h("m0")]

    def test_recording_the_same_provenance_twice_is_a_no_op_and_a_different_one_conflicts(self, store):
        store.record(version("m1", "m0", 1, {"a": "S1", "b": "T1"}))
        with pytest.raises(ConflictError):
            store.record(version("m1", "m0", 1, {"a": "S1", "b": "T9"}))

    def test_a_version_whose_parent_is_unknown_is_refused(self, store):
        with pytest.raises(NotFoundError):
            store.record(version("x1", "nobody", 1, {"a": "S1"}))

    def test_a_withdrawal_flags_exactly_the_versions_trained_on_an_affected_snapshot_and_their_descendants(
        self, store, site_log
    ):
        # site a reports: the withdrawn patient was in snapshots S1 and S2 (not S3, not S4)
        flags = store.flag_withdrawal(
            [h("S1"), h("S2")], site="a", notice_id="wd_1", at=T0 + timedelta(days=9)
        )
        by_model = {f.model_digest: f for f in flags}
        assert {d for d, f in by_model.items() if f.reason is FlagReason.TRAINED_ON_WITHDRAWN} == {
            h("m1"),
            h("m2"),
        }
        assert {d for d, f in by_model.items() if f.reason is FlagReason.DERIVED_FROM_FLAGGED} == {
            h("m3"),
            h("m2b"),
        }
        assert by_model[h("m3")].via_digest == h("m2")
        assert by_model[h("m2b")].via_digest == h("m1")
        assert by_model[h("m1")].snapshot_hash == h("S1")
        # untouched: the initial model, the other study (its S4 did not include the patient), and site b's
        # own snapshot that happens to share S1's hash in m2b (the notice was site a's)
        for name in ("m0", "o0", "o1"):
            assert store.flags(h(name)) == []
        flagged_entries = [e for e in site_log.entries() if e.type is AuditEventType.MODEL_FLAGGED]
        assert sorted(e.payload["model_digest"] for e in flagged_entries) == sorted(by_model)

    def test_a_withdrawal_notice_delivered_twice_flags_once(self, store, site_log):
        first = store.flag_withdrawal([h("S2")], site="a", notice_id="wd_2")
        second = store.flag_withdrawal([h("S2")], site="a", notice_id="wd_2")
        assert first == second
        assert {f.model_digest for f in first} == {h("m2"), h("m3")}
        assert sum(e.type is AuditEventType.MODEL_FLAGGED for e in site_log.entries()) == 2

    def test_a_withdrawal_reported_by_another_site_flags_by_that_sites_snapshots(self, store):
        flags = store.flag_withdrawal([h("S1")], site="b", notice_id="wd_3")
        assert {f.model_digest for f in flags if f.reason is FlagReason.TRAINED_ON_WITHDRAWN} == {h("m2b")}

    def test_a_withdrawal_notice_with_a_bad_hash_is_refused(self, store):
        with pytest.raises(InputError):
            store.flag_withdrawal(["not-a-hash"], site="a", notice_id="wd_4")

    def test_metrics_are_stored_per_site_and_replaced(self, store):
        store.record_metrics(h("m3"), "a", {"auc": 0.81, "num_eval_samples": 120})
        store.record_metrics(h("m3"), "a", {"auc": 0.83, "num_eval_samples": 120})
        store.record_metrics(h("m3"), "b", {"auc": 0.79, "num_eval_samples": 3})
        assert store.metrics(h("m3")) == {
            "a": {"auc": 0.83, "num_eval_samples": 120.0},
            "b": {"auc": 0.79, "num_eval_samples": 3.0},
        }

    def test_a_digest_prefix_resolves_to_the_one_version(self, store):
        assert store.resolve(h("m3")[:12]) == h("m3")
        with pytest.raises(InputError):
            store.resolve("abc")


class TestProvenanceOnSqlite(ProvenanceContract):
    backend = "sqlite"


@pytest.mark.postgres
class TestProvenanceOnPostgres(ProvenanceContract):
    backend = "postgres"


@pytest.mark.parametrize(
    "changes",
    [
        {"model_digest": "abc"},
        {"parent_digest": h("m1")},  # its own digest
        {"n_sites": 3},
        {"consent_snapshots": {"a": h("S1")}},
        {"epsilon_spent": {"a": -1.0, "b": 0.1}},
        {"epsilon_spent": {"z": 1.0}},
        {"round": -1},
        {"created_at": datetime(2026, 1, 1)},
        {"dp_params": {"delta": float("nan")}},
    ],
    ids=[
        "digest",
        "self-parent",
        "n-sites",
        "snapshots",
        "negative-eps",
        "eps-site",
        "round",
        "naive",
        "dp-nan",
    ],
)
def test_an_inconsistent_provenance_is_refused(changes: dict[str, Any]):
    base = version("m1", "m0", 1, {"a": "S1", "b": "T1"})
    fields = {f: getattr(base, f) for f in ModelProvenance.__dataclass_fields__}
    with pytest.raises(InputError):
        ModelProvenance(**{**fields, **changes})


# --- PROV-JSON and the model card ---------------------------------------------------------------------------

RECORD_KINDS = {"entity", "activity", "agent"}
RELATION_ROLES = {
    "wasGeneratedBy": {"prov:entity": "entity", "prov:activity": "activity"},
    "used": {"prov:activity": "activity", "prov:entity": "entity"},
    "wasDerivedFrom": {
        "prov:generatedEntity": "entity",
        "prov:usedEntity": "entity",
        "prov:activity": "activity",
    },
    "wasAssociatedWith": {"prov:activity": "activity", "prov:agent": "agent"},
    "wasAttributedTo": {"prov:entity": "entity", "prov:agent": "agent"},
}


def chain() -> list[ModelProvenance]:
    versions = {p.model_digest: p for p in lineage_fixture()}
    return [versions[h(n)] for n in ("m3", "m2", "m1", "m0")]


@pytest.mark.parametrize(
    "versions",
    [("m3", "m2", "m1", "m0"), ("m3", "m2")],  # the whole lineage, and one cut above its root (m1 absent)
    ids=["to-the-root", "cut"],
)
def test_prov_json_has_the_required_sections_and_every_reference_resolves(versions):
    by_digest = {p.model_digest: p for p in lineage_fixture()}
    doc = json.loads(json.dumps(to_prov_json([by_digest[h(name)] for name in versions])))
    assert {"prefix", *RECORD_KINDS, *RELATION_ROLES} <= set(doc)
    assert doc["prefix"]["fh"] == PROV_NAMESPACE
    declared = {kind: set(doc[kind]) for kind in RECORD_KINDS}
    prefixes = set(doc["prefix"]) | {"prov"}
    names = [name for kind in RECORD_KINDS for name in doc[kind]]
    for relation, roles in RELATION_ROLES.items():
        assert doc[relation], relation
        for rel_id, attrs in doc[relation].items():
            assert rel_id.startswith("_:")
            # Every role it relates, under PROV's attribute names, and no other prov: attribute but a time:
            # a misspelt or missing role would be a relation that points nowhere.
            used_roles = {k for k in attrs if k.startswith("prov:")} - {"prov:time"}
            assert used_roles == set(roles), (relation, attrs)
            for role, kind in roles.items():
                assert attrs[role] in declared[kind], (relation, role, attrs[role])
                names.append(attrs[role])
    types = [r["prov:type"]["$"] for kind in RECORD_KINDS for r in doc[kind].values() if "prov:type" in r]
    assert all(name.split(":", 1)[0] in prefixes for name in names + types)
    # the oldest version's parent is declared even when the lineage stops short of it
    assert f"fh:model/{h('m1')}" in doc["entity"]


def test_prov_json_derivations_follow_the_lineage_and_name_every_contributing_site():
    doc = to_prov_json(chain())
    derived = {(a["prov:generatedEntity"], a["prov:usedEntity"]) for a in doc["wasDerivedFrom"].values()}
    assert derived == {
        (f"fh:model/{h('m3')}", f"fh:model/{h('m2')}"),
        (f"fh:model/{h('m2')}", f"fh:model/{h('m1')}"),
        (f"fh:model/{h('m1')}", f"fh:model/{h('m0')}"),
    }
    assert {"fh:site/a", "fh:site/b"} <= set(doc["agent"])
    used = {a["prov:entity"] for a in doc["used"].values()}
    assert f"fh:consent/a/{h('S2')}" in used
    assert f"fh:spec/{SPEC}" in used
    eps = [
        a.get("fh:epsilonSpent") for a in doc["wasAssociatedWith"].values() if a["prov:agent"] == "fh:site/a"
    ]
    assert sorted(e for e in eps if e is not None) == [0.5, 1.0, 1.5]


def test_the_model_card_has_every_section_and_the_facts_of_the_version():
    card = model_card_markdown(
        chain(),
        intended_use="Early warning of sepsis in adult ICU patients; research only.",
        site_metrics={
            "a": {"auc": 0.8123, "num_eval_samples": 120},
            "b": {"auc": 0.77, "num_eval_samples": 3},
        },
    )
    for section in (
        "## Model details",
        "## Intended use",
        "## Data",
        "## Per-site metrics",
        "## Privacy guarantee",
        "## Consent statement",
        "## Lineage",
    ):
        assert section in card
    assert h("m3") in card
    assert "Early warning of sepsis" in card
    assert "| a | 0.8123 | 120 |" in card
    assert "| b | 0.77 | <5 |" in card
    assert "ε ≤ 1.5 and δ = 1e-05" in card
    assert h("S3") in card
    assert "No consent withdrawal affecting this model version" in card


def test_the_model_card_states_a_withdrawal_flag_and_the_absence_of_dp():
    flag = WithdrawalFlag(
        model_digest=h("m3"),
        notice_id="wd_1",
        site="a",
        reason=FlagReason.DERIVED_FROM_FLAGGED,
        snapshot_hash=None,
        via_digest=h("m2"),
        flagged_at=T0,
    )
    no_dp = version("m3", "m2", 3, {"a": "S3", "b": "T1"}, eps={})
    card = model_card_markdown([no_dp], intended_use="x", flags=[flag])
    assert "**Flagged:**" in card
    assert h("m2")[:16] in card
    assert "No differential-privacy guarantee" in card
    assert "No per-site evaluation" in card


def _measured(dataset: str, setting: str, eps: float | None, auc: float, tpr: float, attack: str) -> dict:
    return {
        "dataset": dataset,
        "setting": setting,
        "target_epsilon": eps,
        "epsilon": eps,
        "delta": 1e-5 if eps is not None else None,
        "attack": attack,
        "auc": auc,
        "tpr_at_fpr": tpr,
        "fpr": 0.01,
        "members": 100,
        "non_members": 100,
    }


MEMBERSHIP = MembershipReport.from_json(
    {
        "kind": "fedhealth-membership-benchmark",
        "measured_at": "2026-12-06T10:00:00Z",
        "setup": {"models": 8},
        "measurements": [
            _measured("heart-disease", "DP-SGD", 1.0, 0.51, 0.012, "loss"),
            _measured("heart-disease", "DP-SGD", 1.0, 0.53, 0.011, "lira-offline"),
            _measured("heart-disease", "DP-SGD", 4.0, 0.55, 0.02, "lira-offline"),
            _measured("heart-disease", "no DP", None, 0.6, 0.05, "lira-online"),
        ],
    }
)


def test_the_model_card_carries_the_measured_membership_figures_beside_epsilon():
    card = model_card_markdown(chain(), intended_use="x", membership=MEMBERSHIP)
    section = card.split("### Measured membership inference", 1)[1].split("## Consent statement")[0]
    # one row per setting, its strongest attack; the epsilon beside it
    assert "| heart-disease | DP-SGD | n/a | 1 (1e-05) | lira-offline | 0.530 | 0.011 |" in section
    assert "| heart-disease | no DP | n/a | ∞ (no DP) | lira-online | 0.600 | 0.050 |" in section
    assert "not on this one" in section
    # the model's own epsilon (1.5) falls under the nearest measured epsilon not below it: 4
    assert "ε ≤ 1.5: at the nearest measured ε not below it (4, heart-disease)" in section
    assert "AUC 0.550 and TPR 0.020" in section
    no_dp = version("m3", "m2", 3, {"a": "S3"}, eps={})
    card = model_card_markdown([no_dp], intended_use="x", membership=MEMBERSHIP)
    assert "compare it with the no-DP rows" in card
    above = version("m3", "m2", 30, {"a": "S3"})  # epsilon 15
    card = model_card_markdown([above], intended_use="x", membership=MEMBERSHIP)
    assert "above every measured ε" in card
    assert "Measured membership inference" not in model_card_markdown(chain(), intended_use="x")
