"""Attacks on "a site releases no figure computed from fewer than k patients" for its held-out (test) rows
(docs/privacy.md, *Every value a site releases*; docs/governance.md, step 10): the real agent with its real
gates on a real site home, handed training and evaluation tasks by an orchestrator that would like the
loss, accuracy or AUC of a held-out part of one or two patients.

Each refusal or withholding has its control: the same task on a held-out part of at least k patients does
release its metrics, so a test cannot pass because no metric was ever computed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from site_fixtures import agent, approve, make_home, task

from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance
from fedhealth.governance import AuditEventType, ConsentDecision, ConsentRecord, read_stored_log
from fedhealth.protocol import SiteMetrics, StudySpec, TaskKind
from support import logreg_recipe

PATIENTS = [f"p{i:04d}" for i in range(40)]
HELD_OUT_FIGURES = ("eval_loss", "accuracy", "auc")


def write_csv(path: Path) -> Path:
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(PATIENTS)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def uri(path: Path, test_fraction: float) -> str:
    """40 patients, stratified: a test fraction of 0.3 holds out 12, 0.2 holds out 8, 0.05 holds out 2."""
    return f"file://{path}?label=label&id=patient_id&test_fraction={test_fraction}"


def study(name: str = "held-out-study") -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": name,
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 2,
            "train_sites": ["hospital-a"],
        }
    )


def evaluation(spec: StudySpec, task_id: str = "tk-eval"):
    return task(spec, kind=TaskKind.EVALUATE, round=spec.rounds + 1, task_id=task_id)


def released(metrics: SiteMetrics) -> dict[str, object]:
    """The held-out figures a site's metrics carry (count included when it is not zero)."""
    figures = {k: getattr(metrics, k) for k in HELD_OUT_FIGURES if getattr(metrics, k) is not None}
    if metrics.num_eval_samples:
        figures["num_eval_samples"] = metrics.num_eval_samples
    return figures


def decisions(home: SiteHome, task_id: str) -> list[dict[str, object]]:
    with SiteGovernance(home) as governance:
        entries = read_stored_log(governance.engine).entries
    return [
        e.payload
        for e in entries
        if e.type == AuditEventType.POLICY_DECISION and e.payload["subject"].get("task_id") == task_id
    ]


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    return make_home(tmp_path / "site")


# --- the control: k held-out patients or more, the metrics go out -------------------------------------------


def test_control_a_held_out_part_of_at_least_k_patients_releases_its_metrics(home, tmp_path):
    spec = study()
    approve(home, spec)
    site, client = agent(home, {"cohort": uri(write_csv(tmp_path / "d.csv"), 0.3)})  # 12 held out, k = 10
    site.handle(task(spec))
    site.handle(evaluation(spec))
    assert client.failures == []
    (result,) = client.results
    (evaluated,) = client.evaluations
    assert result.metrics is not None
    assert evaluated.metrics is not None
    assert result.metrics.num_samples == 28
    assert released(result.metrics).keys() == {"num_eval_samples", "eval_loss", "accuracy", "auc"}
    assert released(evaluated.metrics)["num_eval_samples"] == 12


# --- a training round on 1..k-1 held-out patients trains, uploads, and withholds ----------------------------


@pytest.mark.parametrize(("test_fraction", "policy"), [(0.05, ""), (0.2, ""), (0.3, "min_cohort_k = 20\n")])
def test_a_training_round_with_fewer_than_k_held_out_patients_uploads_its_update_without_held_out_metrics(
    home, tmp_path, test_fraction, policy
):
    spec = study()
    approve(home, spec)
    home.policy_path.write_text(policy)
    site, client = agent(home, {"cohort": uri(write_csv(tmp_path / "d.csv"), test_fraction)})
    site.handle(task(spec))
    assert client.failures == []  # training on >= k training patients is still done
    (result,) = client.results
    assert result.metrics is not None
    assert result.metrics.num_samples >= 20
    assert released(result.metrics) == {}
    # the site's own log says why, and states no count
    (held_out,) = [d for d in decisions(home, "tk-1") if d["subject"].get("rows") == "held-out"]
    assert held_out["rule"] == "min_cohort_k"
    assert held_out["allowed"] is False
    assert not any(ch.isdigit() for ch in str(held_out["reason"]).replace("k=10", "").replace("k=20", ""))


# --- an evaluation on 1..k-1 held-out patients answers with no figure ------------------------------------


def _no_figure(metrics: object) -> None:
    assert metrics is not None
    assert (metrics.num_eval_samples, metrics.eval_loss, metrics.accuracy, metrics.auc) == (
        0,
        None,
        None,
        None,
    )


def test_an_evaluation_of_fewer_than_k_held_out_patients_answers_with_no_figure(home, tmp_path):
    """Not refused: inside a secure sum a refusal would leave the round short of its threshold, so the site
    answers, with nothing computed from the held-out rows (a secure sum gets zeros)."""
    spec = study()
    approve(home, spec)
    site, client = agent(home, {"cohort": uri(write_csv(tmp_path / "d.csv"), 0.05)})  # 2 held out
    site.handle(evaluation(spec))
    assert client.failures == []
    (answered,) = client.evaluations
    _no_figure(answered.metrics)
    # the decision in the site's log names k, never the count
    (held_out,) = [d for d in decisions(home, "tk-eval") if d["subject"].get("rows") == "held-out"]
    assert (held_out["rule"], held_out["allowed"]) == ("min_cohort_k", False)
    assert "2" not in str(held_out["reason"]).replace("k=10", "")


def test_consent_that_leaves_fewer_than_k_held_out_patients_withholds_the_evaluations_figures(home, tmp_path):
    """12 held-out rows in the file, but only the patients who permit count: deny all but a few of them."""
    spec = study()
    approve(home, spec)
    site, client = agent(home, {"cohort": uri(write_csv(tmp_path / "d.csv"), 0.3)})
    site.handle(evaluation(spec, task_id="tk-control"))
    assert client.failures == []
    (control,) = client.evaluations
    assert control.metrics is not None
    assert control.metrics.eval_loss is not None
    with SiteGovernance(home) as governance:
        registry = governance.consent()
        registry.add(
            [
                ConsentRecord(
                    patient_id=p,
                    purpose="research",
                    decision=ConsentDecision.DENY if i % 4 == 0 else ConsentDecision.PERMIT,
                )
                for i, p in enumerate(PATIENTS)
            ]
        )
    site.handle(evaluation(spec))
    assert client.failures == []
    _no_figure(client.evaluations[1].metrics)
