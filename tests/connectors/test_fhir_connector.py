"""The FHIR R4 connector against a real FHIR server on loopback (PyPI's sekmet-fhir, in its own virtualenv,
started by the tests), and the client's paging, auth, retry and origin rules against a mock transport."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
from heart_sources import (
    FHIR_MAPPING,
    FLAT_SCHEMA,
    TOKEN,
    fhir_resources,
    free_port,
    patients,
    research_consent,
    sekmet_server,
    write_csv,
)

from fedhealth.core import ConfigError
from fedhealth.data import (
    CredentialsRefusedError,
    FhirClient,
    SourceUnavailableError,
    UnitMismatchError,
    open_dataset,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, heart_dir):
    """One FHIR server holding Switzerland's patients, and research consent for all but the first three."""
    people = patients(2, heart_dir)
    with sekmet_server(tmp_path_factory.mktemp("fhir")) as fhir:
        fhir.load(fhir_resources(people))
        fhir.load([research_consent(p.pid) for p in people[3:]])
        yield fhir, people


@pytest.fixture
def mapping(tmp_path):
    path = tmp_path / "heart-fhir.toml"
    path.write_text(FHIR_MAPPING)
    return path


def fhir_uri(base_url: str, mapping, extra: str = "") -> str:
    return f"fhir+{base_url}?mapping={mapping}&token_env=FHIR_TOKEN{extra}"


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("FHIR_TOKEN", TOKEN)


def test_a_fhir_server_gives_the_same_features_as_the_csv_file_of_the_same_patients(
    server, mapping, tmp_path
):
    fhir, people = server
    schema = tmp_path / "flat.toml"
    schema.write_text(FLAT_SCHEMA)
    from_csv = open_dataset(f"file://{write_csv(tmp_path / 'heart.csv', people)}?schema={schema}")
    # a small page size: the client follows the server's next links through many pages
    from_fhir = open_dataset(fhir_uri(fhir.base_url, mapping, "&page_size=7"))
    np.testing.assert_array_equal(from_fhir.X_train, from_csv.X_train)
    np.testing.assert_array_equal(from_fhir.X_test, from_csv.X_test)
    np.testing.assert_array_equal(from_fhir.y_train, from_csv.y_train)
    assert from_fhir.patient_ids_train == from_csv.patient_ids_train
    assert from_fhir.feature_names[:3] == ("age", "sex=male", "trestbps")


def test_a_wrong_or_missing_token_is_refused_credentials(server, mapping, monkeypatch):
    fhir, _ = server
    monkeypatch.setenv("FHIR_TOKEN", "not-the-token")
    with pytest.raises(
        CredentialsRefusedError, match=r"refuses this site's credentials \(HTTP 401\)"
    ) as info:
        open_dataset(fhir_uri(fhir.base_url, mapping))
    assert "not-the-token" not in str(info.value)
    with pytest.raises(CredentialsRefusedError):
        open_dataset(f"fhir+{fhir.base_url}?mapping={mapping}")


def test_a_server_that_is_down_is_one_line_after_its_retries(mapping):
    base = f"http://127.0.0.1:{free_port()}/fhir"
    with pytest.raises(SourceUnavailableError, match=rf"the FHIR server at {base} does not answer") as info:
        open_dataset(fhir_uri(base, mapping, "&retries=1"))
    assert "after 2 attempts" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_observation_in_an_unexpected_unit_refuses_the_dataset(server, mapping):
    fhir, people = server
    wrong = {
        "resourceType": "Observation",
        "id": "chol-in-mmol",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
        "subject": {"reference": f"Patient/{people[5].pid}"},
        "effectiveDateTime": "2020-05-01",
        "valueQuantity": {
            "value": 6.1,
            "unit": "mmol/L",
            "system": "http://unitsofmeasure.org",
            "code": "mmol/L",
        },
    }
    with fhir.client() as http:
        assert http.put("Observation/chol-in-mmol", json=wrong).status_code in (200, 201)
        try:
            with pytest.raises(
                UnitMismatchError,
                match="Observation/chol-in-mmol for feature 'chol' has unit 'mmol/L', not the",
            ):
                open_dataset(fhir_uri(fhir.base_url, mapping))
        finally:
            assert http.delete("Observation/chol-in-mmol").status_code in (200, 204)


def test_adding_a_fhir_dataset_with_consent_fills_the_site_consent_registry(server, mapping, tmp_path):
    from site_cli import cli, make_site_home

    from fedhealth.agent import SiteHome
    from fedhealth.agent._governance import SiteGovernance
    from fedhealth.governance import ConsentDecision, decide

    fhir, people = server
    home = make_site_home(tmp_path)
    uri = fhir_uri(fhir.base_url, mapping, "&consent=true")
    added = cli("site", "dataset", "add", "heart", uri, "--home", home)
    assert added.exit_code == 0, added.output
    assert f"consent from the FHIR server: {len(people) - 3} added" in added.stdout
    again = cli("site", "dataset", "sync-consent", "heart", "--home", home)
    assert f"0 added, 0 updated, {len(people) - 3} unchanged" in again.stdout
    with SiteGovernance(SiteHome(home)) as governance:
        registry = governance.consent()
        now = datetime.now(UTC)
        assert decide(registry.records(people[5].pid), "research", now) is ConsentDecision.PERMIT
        assert decide(registry.records(people[0].pid), "research", now) is None


# --- the client, against a mock transport -------------------------------------------------------------------


def _bundle(ids: list[str], next_url: str | None = None) -> dict:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [
            {"resource": {"resourceType": "Patient", "id": i}, "search": {"mode": "match"}} for i in ids
        ],
    }


def test_the_client_retries_with_backoff_and_honours_retry_after():
    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "3"}),
            httpx.Response(200, json=_bundle(["a", "b"])),
        ]
    )
    slept: list[float] = []
    client = FhirClient(
        "https://fhir.test/r4",
        transport=httpx.MockTransport(lambda request: next(answers)),
        sleep=slept.append,
    )
    assert [p["id"] for p in client.search("Patient")] == ["a", "b"]
    assert slept == [0.5, 3.0]


def test_the_client_follows_next_links_only_on_the_same_origin():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer t0k3n"
        if "_offset" in str(request.url):
            return httpx.Response(200, json=_bundle(["c"], "https://elsewhere.test/r4/Patient?_offset=4"))
        return httpx.Response(200, json=_bundle(["a", "b"], "https://fhir.test/r4/Patient?_offset=2"))

    client = FhirClient("https://fhir.test/r4", token="t0k3n", transport=httpx.MockTransport(handler))
    seen = []
    with pytest.raises(SourceUnavailableError, match="sent a next page on another origin"):
        seen.extend(p["id"] for p in client.search("Patient"))
    assert seen == ["a", "b", "c"]


def test_the_client_refuses_a_server_that_is_not_fhir_r4():
    metadata = {"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"}
    client = FhirClient(
        "https://fhir.test/r5", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=metadata))
    )
    with pytest.raises(SourceUnavailableError, match=r"is not a FHIR R4 server \(fhirVersion 5.0.0\)"):
        client.capability()
    html = FhirClient(
        "https://fhir.test/r4", transport=httpx.MockTransport(lambda r: httpx.Response(200, text="<html>"))
    )
    with pytest.raises(SourceUnavailableError, match="not a FHIR JSON resource"):
        html.capability()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (FHIR_MAPPING.replace('kind = "age"', 'kind = "age"\nunit = "a"'), "unit goes with a latest feature"),
        (
            FHIR_MAPPING.replace('resource = "MedicationRequest"', 'resource = "Encounter"'),
            "features.13.resource",
        ),
        (FHIR_MAPPING.replace("window = [1, 365]", "window = [1]"), "a window is \\[first day, last day\\]"),
        (FHIR_MAPPING.replace('name = "chol"', 'name = "age"'), "feature names must be unique"),
    ],
)
def test_a_bad_mapping_names_the_key(tmp_path, text, match):
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        open_dataset(f"fhir+http://127.0.0.1:9/fhir?mapping={path}")


def test_the_agent_reads_consent_from_the_fhir_server_again_for_each_study(tmp_path, heart_dir, mapping):
    """A patient who withdraws on the hospital's FHIR server between two studies is out of the second one:
    the agent imports the server's Consent resources again at each study's first task (issue 15), not only
    when the dataset was added or the agent started."""
    from agent.site_fixtures import agent, approve, make_home, task
    from fedhealth.agent._governance import SiteGovernance
    from fedhealth.governance import ConsentDecision, decide
    from fedhealth.protocol import StudySpec
    from support import logreg_recipe

    people = patients(2, heart_dir)
    with sekmet_server(tmp_path / "fhir") as fhir:
        fhir.load(fhir_resources(people))
        fhir.load([research_consent(p.pid) for p in people])
        uri = fhir_uri(fhir.base_url, mapping, "&consent=true")
        width = len(open_dataset(uri).feature_names)
        home = make_home(tmp_path / "site")
        spec = StudySpec(
            name="fhir-consent",
            dataset="heart",
            recipe=logreg_recipe(width),
            rounds=1,
            train_sites=["hospital-a"],
        )
        approve(home, spec)
        a, client = agent(home, {"heart": uri})
        a.handle(task(spec).model_copy(update={"study_id": "st-1", "task_id": "tk-1"}))
        withdrawn = people[:10]
        fhir.load([research_consent(p.pid, "deny") for p in withdrawn])  # withdrawn at the hospital
        a.handle(task(spec).model_copy(update={"study_id": "st-2", "task_id": "tk-2"}))
    assert client.failures == []
    first, second = (r.metrics.num_samples for r in client.results if r.metrics is not None)
    assert second < first
    with SiteGovernance(home) as governance:
        registry = governance.consent()
        now = datetime.now(UTC)
        assert all(
            decide(registry.records(p.pid), "research", now) is ConsentDecision.DENY for p in withdrawn
        )
        assert decide(registry.records(people[20].pid), "research", now) is ConsentDecision.PERMIT
