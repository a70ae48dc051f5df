"""Four hospitals' Fed-Heart-Disease patients served four ways (a CSV file, a PostgreSQL table, an OMOP CDM
v5.4 database, a FHIR R4 server), registered with `fedhealth site dataset add`, trained through the real
services: the same study on each form gives the same federated model, bit for bit.

Also through the real services: a source that is gone when its task comes is refused with the code
``dataset_unavailable`` and charges no budget; consent read from a FHIR server leaves too few patients for the
site's minimum cohort, so the task is refused with ``min_cohort_k`` and charges no budget; and no database
password or FHIR token reaches a log, an audit entry or the orchestrator.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import quote

import numpy as np
import pytest

from connectors.heart_sources import (
    FHIR_MAPPING,
    FLAT_SCHEMA,
    OMOP_DEFINITION,
    fhir_resources,
    load_flat_table,
    load_omop,
    patients,
    research_consent,
    sekmet_server,
    write_csv,
)
from connectors.site_cli import cli
from fedhealth.agent._governance import SiteGovernance
from fedhealth.core import decode_tensors
from fedhealth.protocol import (
    FailureCode,
    PrivacySpec,
    StrategySpec,
    StudySpec,
    StudyStatus,
    TaskStatus,
)
from fedhealth.runtime import param_specs
from fedhealth.sim import LocalFederation
from support import POSTGRES_URL, heart_data_dir, logreg_recipe, postgres_admin, postgres_schema_name

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

HOSPITALS = {"cleveland": 0, "hungary": 1, "switzerland": 2, "va": 3}
FORMS = ("csv", "sql", "omop", "fhir")
PASSWORD = "pw-" + secrets.token_hex(8)  # trust auth ignores it; it must still never leave the registry
DELTA = 1e-5
CONSENTING = 20
MIN_COHORT = 25


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[tuple[LocalFederation, dict[str, object]]]:
    data_dir = heart_data_dir()
    root = tmp_path_factory.mktemp("connectors-federation")
    engine = postgres_admin()
    declarations = root / "declarations"
    declarations.mkdir()
    (declarations / "flat.toml").write_text(FLAT_SCHEMA)
    (declarations / "omop.toml").write_text(OMOP_DEFINITION)
    (declarations / "fhir.toml").write_text(FHIR_MAPPING)
    url = POSTGRES_URL.replace("postgres@", f"postgres:{PASSWORD}@")
    with ExitStack() as stack:
        servers = {}
        uris: dict[str, dict[str, str]] = {}
        for site, center in HOSPITALS.items():
            people = patients(center, data_dir)
            schema = stack.enter_context(postgres_schema_name(f"e2e_{site}"))
            load_flat_table(engine, schema, "heart", people)
            load_omop(engine, schema, people)
            fhir = stack.enter_context(sekmet_server(root / f"fhir-{site}"))
            fhir.load(fhir_resources(people))
            servers[site] = fhir
            token = quote(fhir.token)
            flat = declarations / "flat.toml"
            uris[site] = {
                "heart-csv": f"file://{write_csv(root / f'{site}.csv', people)}?schema={flat}",
                "heart-sql": f"sql+{POSTGRES_URL}?table=heart&db_schema={schema}"
                f"&password={PASSWORD}&schema={flat}",
                "heart-omop": f"omop+{url}?definition={declarations / 'omop.toml'}&cdm_schema={schema}",
                "heart-fhir": f"fhir+{fhir.base_url}?mapping={declarations / 'fhir.toml'}&token={token}",
            }
        # one more FHIR server, only for the VA: it goes away before its study's task comes
        gone = stack.enter_context(sekmet_server(root / "fhir-gone"))
        gone.load(fhir_resources(patients(3, data_dir)))
        mapping = declarations / "fhir.toml"
        uris["va"]["heart-gone"] = f"fhir+{gone.base_url}?mapping={mapping}&token={quote(gone.token)}"
        # Bern keeps Switzerland's patients on a FHIR server that also holds their Consent resources: only
        # CONSENTING of them consented to research
        bern = stack.enter_context(sekmet_server(root / "fhir-bern"))
        swiss = patients(2, data_dir)
        bern.load(fhir_resources(swiss))
        bern.load([research_consent(p.pid) for p in swiss[:CONSENTING]])
        servers["bern"] = bern
        uris["bern"] = {
            "heart-consent": f"fhir+{bern.base_url}?mapping={mapping}&token={quote(bern.token)}&consent=true"
        }
        fed = stack.enter_context(LocalFederation(root / "fed", log_level="info"))
        fed.start_orchestrator()
        for site in uris:
            fed.add_site(site)
            for name, uri in uris[site].items():
                added = cli("site", "dataset", "add", name, uri, "--home", fed.site_home(site).root)
                assert added.exit_code == 0, added.output
        fed.set_budget("va", "heart-gone", 5.0, DELTA)
        fed.set_budget("bern", "heart-consent", 5.0, DELTA)
        (fed.site_home("bern").root / "policy.toml").write_text(f"min_cohort_k = {MIN_COHORT}\n")
        for site in uris:
            fed.start_agent(site, {})  # the registered datasets, checked when the agent starts
        fed.wait_for_sites(list(uris))
        gone.process.terminate()
        gone.process.wait(timeout=10)
        yield fed, {"servers": servers, "uris": uris}


def heart_spec(dataset: str, **extra: object) -> StudySpec:
    fields: dict[str, object] = {
        "name": f"heart-{dataset}",
        "dataset": dataset,
        "recipe": logreg_recipe(14, local_epochs=2, learning_rate=0.1, batch_size=16),
        "strategy": StrategySpec(name="fedavg"),
        "rounds": 3,
        "train_sites": sorted(HOSPITALS),
        "min_sites": 4,
        "round_deadline_s": 120.0,
        "seed": 15,
    }
    fields.update(extra)
    return StudySpec.model_validate(fields)


def test_the_same_study_on_csv_sql_omop_and_fhir_gives_the_same_model_bit_for_bit(federation):
    fed, _ = federation
    models = {}
    for form in FORMS:
        spec = heart_spec(f"heart-{form}")
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=600)
        assert final.status is StudyStatus.COMPLETED, (form, final)
        params, _ = decode_tensors(fed.model_bytes(final.study_id), param_specs(spec.recipe))
        models[form] = params
    reference = models["csv"]
    assert any(np.abs(v).sum() > 0 for v in reference.values())  # the model learned something
    for form in FORMS[1:]:
        assert models[form].keys() == reference.keys()
        for key, value in reference.items():
            assert value.tobytes() == models[form][key].tobytes(), (form, key)


def test_a_source_gone_at_task_time_is_refused_with_its_code_and_charges_no_budget(federation):
    fed, _ = federation
    final = fed.wait_for_study(fed.create_study(dp_spec("heart-gone", "va")).study_id, timeout=300)
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert task.reason == "dataset_unavailable: the site's dataset for this study is not available"
    ledger = fed.budget_ledger("va")
    assert ledger.statement("heart-gone").spent_epsilon == 0.0
    assert ledger.pending("heart-gone") == []
    site_log = (fed.logs / "agent-va.log").read_text()
    assert "does not answer" in site_log  # the site's own log says what happened


def dp_spec(dataset: str, site: str) -> StudySpec:
    return heart_spec(
        dataset,
        name=f"{dataset}-dp",
        train_sites=[site],
        min_sites=1,
        rounds=1,
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
        ),
    )


def test_patients_without_consent_on_the_fhir_server_leave_too_few_and_the_task_is_refused(federation):
    fed, _ = federation
    with SiteGovernance(fed.site_home("bern")) as governance:
        consented = {r.patient_id for r in governance.consent().records()}
    assert len(consented) == CONSENTING  # imported from the FHIR server when the dataset was added
    final = fed.wait_for_study(fed.create_study(dp_spec("heart-consent", "bern")).study_id, timeout=300)
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert task.reason == f"min_cohort_k: {FailureCode.MIN_COHORT.message}"
    ledger = fed.budget_ledger("bern")
    assert ledger.statement("heart-consent").spent_epsilon == 0.0
    assert ledger.pending("heart-consent") == []


def test_no_password_or_token_reaches_a_log_an_audit_entry_or_the_orchestrator(federation):
    fed, extra = federation
    tokens = {server.token for server in extra["servers"].values()}
    secrets_ = {PASSWORD, *tokens}
    shown: dict[str, str] = {}
    studies = fed.operator.request("GET", "/api/v1/studies").text
    shown["studies api"] = studies
    shown["orchestrator audit"] = fed.operator.request("GET", "/api/v1/governance/audit").text
    fed.stop_orchestrator()  # its log flushed, its database checkpointed
    try:
        for path in fed.logs.glob("*.log"):
            shown[f"log {path.name}"] = path.read_text()
        for path in fed.state_dir.rglob("*"):
            if path.is_file():
                shown[f"orchestrator file {path.name}"] = path.read_bytes().decode("latin-1")
        for site in extra["uris"]:
            for path in fed.site_home(site).root.glob("site.sqlite*"):
                shown[f"{site} {path.name} (audit log, ledger, consent)"] = path.read_bytes().decode(
                    "latin-1"
                )
    finally:
        fed.start_orchestrator()
    for where, text in shown.items():
        for secret in secrets_:
            assert secret not in text, f"a secret reached {where}"
    # kept where the site put it: its private registry, which is what the agent opened
    registry = fed.site_home("va").root / "datasets.json"
    assert PASSWORD in registry.read_text()
    assert json.loads(registry.read_text())["heart-sql"]["uri"].startswith("sql+")
    assert (registry.stat().st_mode & 0o077) == 0
