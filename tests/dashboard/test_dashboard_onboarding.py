"""The onboarding kit: rendered from the federation's actual settings (a study's secure aggregation threshold
and epsilon, the budgets a site attested), naming no file path, URL, key or credential; an unknown site is one
clear error; the CLI writes the three Markdown files from the orchestrator's home; admins download it from the
dashboard, other roles are refused (and audited)."""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from dashboard_support import Dashboard, add_user, dashboard_app, sign_in
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.core import NotFoundError
from fedhealth.dashboard import PACK_FILES, onboarding_pack
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator import (
    NewRound,
    OrchestratorHome,
    Store,
    init_home,
    make_engine,
    upgrade_database,
)
from fedhealth.protocol import PrivacySpec, Role, SecureAggregationSpec, TaskKind
from support import breast_spec

SITES = ["alpha", "beta", "gamma", "delta"]
THRESHOLD = 3
EPSILON = 1.75
BUDGET = 6.5


def populate(store: Store, audit: AuditLog) -> None:
    """Four sites, one secure DP study naming them all, one budget attestation of alpha."""
    now = audit.clock.now()
    for site in SITES:
        store.create_site(site, now)
    spec = breast_spec(
        SITES,
        rounds=2,
        name="dp-secure",
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: f"{i:064x}" for i, s in enumerate(SITES)}, threshold=THRESHOLD
        ),
        privacy=PrivacySpec(
            delta=1e-5, target_epsilon=EPSILON, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
        ),
    )
    first = NewRound(
        number=1,
        kind=TaskKind.TRAIN,
        sites=SITES,
        model_in_digest="0" * 64,
        deadline_at=now + timedelta(hours=1),
    )
    store.create_study(spec=spec, model_digest="0" * 64, state_digest=None, first=first, when=now)
    audit.append(
        AuditEventType.BUDGET_SPENT,
        {
            "task_id": "t-1",
            "study_id": "st_x",
            "site": "alpha",
            "round": 1,
            "kind": "train",
            "dataset": "breast-cancer",
            "delta": 1e-5,
            "study_epsilon": 0.4,
            "total_epsilon": 0.4,
            "budget_epsilon": BUDGET,
            "task_epsilon": 0.4,
        },
    )


@pytest.fixture
def dash(tmp_path):
    with dashboard_app(tmp_path / "state") as d:
        populate(d.svc.store, d.svc.audit)
        yield d


def test_the_pack_names_the_real_threshold_epsilon_and_budget_and_no_path_or_secret(
    dash: Dashboard, tmp_path
):
    api_key = add_user(dash.svc, "root", Role.ADMIN)
    pack = onboarding_pack(dash.svc.store, dash.svc.audit, "alpha")
    assert sorted(pack) == sorted(PACK_FILES)
    irb = pack["irb-consultation.md"]
    assert '"alpha"' in irb
    assert f"| dp-secure | 4 | {THRESHOLD} | 1 |" in irb  # threshold and tolerated collusion (n // 3)
    assert f"| {EPSILON} | 1e-05 |" in irb
    assert f"| breast-cancer | {BUDGET} | 0.4 | 1e-05 |" in irb
    assert "ok: " in irb  # the audit log's verification
    annex = pack["dpa-annex-toms.md"]
    assert f"threshold {THRESHOLD} of 4 sites" in annex
    assert f"epsilon {EPSILON}" in annex
    checklist = pack["site-readiness-checklist.md"]
    assert f"- [x] Privacy budget set for dataset breast-cancer: epsilon {BUDGET}." in checklist
    every = "\n".join(pack.values())
    secrets = [
        str(tmp_path),
        "/tmp",
        "sqlite",
        api_key,
        dash.svc.settings.signing_key.public().raw.hex(),
        "{{",
        "}}",
    ]
    for secret in secrets:
        assert secret not in every
    # another site sees the same study; its budgets are its own (none attested)
    beta = onboarding_pack(dash.svc.store, dash.svc.audit, "beta")["irb-consultation.md"]
    assert "has not attested any privacy spend yet" in beta


def test_an_unknown_site_is_one_clear_error(dash: Dashboard):
    with pytest.raises(NotFoundError, match=r"unknown site 'omega' \(sites of this federation: alpha, beta"):
        onboarding_pack(dash.svc.store, dash.svc.audit, "omega")


@pytest.fixture
def home(tmp_path) -> Path:
    root = tmp_path / "orch"
    init_home(root, hosts=["localhost"], url="https://localhost:8443")
    orch = OrchestratorHome(root)
    engine = make_engine(orch.database_url())
    upgrade_database(engine)
    populate(Store(engine), AuditLog(engine, orch.signing_key(), "orchestrator"))
    engine.dispose()
    return root


def test_the_cli_writes_the_kit_from_the_orchestrators_home_and_refuses_to_overwrite(home, tmp_path):
    out = tmp_path / "kit"
    args = ["onboarding", "pack", "--site", "gamma", "--out", str(out), "--home", str(home)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(PACK_FILES)
    irb = (out / "irb-consultation.md").read_text()
    assert f"| dp-secure | 4 | {THRESHOLD} | 1 |" in irb
    assert str(home) not in irb
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1
    assert "already holds" in again.output
    assert (out / "irb-consultation.md").read_text() == irb  # nothing lost


def test_the_cli_names_an_unknown_site_in_one_line(home, tmp_path):
    out = tmp_path / "kit"
    result = CliRunner().invoke(
        app, ["onboarding", "pack", "--site", "omega", "--out", str(out), "--home", str(home)]
    )
    assert result.exit_code == 1
    assert "unknown site 'omega'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_an_admin_downloads_the_kit_from_the_dashboard_and_an_auditor_is_refused(dash: Dashboard):
    key = add_user(dash.svc, "root", Role.ADMIN)
    assert sign_in(dash.client, "root", key).status_code == 200
    assert "/ui/sites/alpha/onboarding.zip" in dash.client.get("/ui/federation").text
    response = dash.client.get("/ui/sites/alpha/onboarding.zip")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = sorted(archive.namelist())
        irb = archive.read("onboarding-alpha/irb-consultation.md").decode()
    assert names == sorted(f"onboarding-alpha/{n}" for n in PACK_FILES)
    assert f"| dp-secure | 4 | {THRESHOLD} | 1 |" in irb
    assert dash.client.get("/ui/sites/omega/onboarding.zip").status_code == 404

    auditor = add_user(dash.svc, "ann", Role.AUDITOR)
    dash.client.cookies.clear()
    assert sign_in(dash.client, "ann", auditor).status_code == 200
    assert "onboarding.zip" not in dash.client.get("/ui/federation").text
    assert dash.client.get("/ui/sites/alpha/onboarding.zip").status_code == 403
    actions = [e.payload for e in dash.svc.audit.entries() if e.type == AuditEventType.UI_ACTION]
    assert {"action": "onboarding kit", "by": "root", "site": "alpha"} in actions
    assert any(a["action"] == "onboarding kit refused" and a["by"] == "ann" for a in actions)


def test_the_cli_refuses_a_folder_that_is_not_a_home_and_an_output_that_is_a_file(home, tmp_path):
    not_home = CliRunner().invoke(
        app, ["onboarding", "pack", "--site", "alpha", "--out", str(tmp_path / "k"), "--home", str(tmp_path)]
    )
    assert not_home.exit_code == 1
    assert "is not an orchestrator home" in not_home.output
    a_file = tmp_path / "taken.md"
    a_file.write_text("keep me")
    clash = CliRunner().invoke(
        app, ["onboarding", "pack", "--site", "alpha", "--out", str(a_file), "--home", str(home)]
    )
    assert clash.exit_code == 1
    assert "is not a folder" in clash.output
    assert a_file.read_text() == "keep me"
