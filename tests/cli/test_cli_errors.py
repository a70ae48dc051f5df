"""Bad input at the command line: each prints exactly one line ``error: <what> (<hint>)``, no traceback, and
exits 1 (a runtime failure) or 2 (a usage error), as README and ``fedhealth.cli._errors`` document."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import fedhealth
from fedhealth.cli import app
from fedhealth.crypto import IdentityKey, create_ca
from support import closed_port, unreachable_credential

runner = CliRunner()


def cli(*args: object, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error(result: Any, code: int) -> str:
    """stderr is exactly one ``error:`` line, with no traceback, and the exit code is ``code``."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def credential(tmp_path) -> Path:
    return unreachable_credential(tmp_path / "admin.credential")


@pytest.fixture
def site_home(tmp_path) -> Path:
    """A site home as `site enroll` leaves it (the orchestrator it names is not running)."""
    home = tmp_path / "site"
    home.mkdir(mode=0o700)
    IdentityKey.generate().save(home / "identity.key")
    (home / "site.json").write_text(
        json.dumps({"site": "hospital-a", "orchestrator": f"https://127.0.0.1:{closed_port()}"})
    )
    (home / "site.json").chmod(0o600)
    return home


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in r) for r in [header, *rows]) + "\n")
    return path


@pytest.fixture
def cohort(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    rows = [[f"P{i:03d}", *np.round(rng.normal(size=3), 3), i % 2] for i in range(30)]
    return write_csv(tmp_path / "cohort.csv", ["patient_id", "age", "bp", "chol", "target"], rows)


# --- version and usage -------------------------------------------------------------------------------------


def test_version_prints_the_software_and_protocol_versions():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fedhealth {fedhealth.__version__} (protocol 1)"


@pytest.mark.parametrize(
    "args",
    [
        ["study", "nope"],
        ["study", "submit"],
        ["study", "list", "--no-such-option"],
        ["user", "add", "bob", "--role", "king"],
        ["site", "serve", "--log-level", "loud"],
        ["study", "list", "--status", "sleeping"],
        ["study", "download", "st_1"],
        ["study", "submit", "study.toml", "--approval-wait", "soon"],
    ],
    ids=[
        "unknown-command",
        "missing-argument",
        "unknown-option",
        "bad-role",
        "bad-log-level",
        "bad-status",
        "nothing-to-download",
        "bad-duration",
    ],
)
def test_usage_errors_exit_2_with_one_line(args):
    line = one_error(cli(*args), 2)
    assert "Usage:" not in line


def test_a_choice_outside_its_enum_names_the_choices():
    line = one_error(cli("user", "add", "bob", "--role", "king"), 2)
    assert "'admin', 'researcher', 'auditor'" in line


# --- the orchestrator unreachable --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["site", "list"],
        ["user", "list"],
        ["study", "list"],
        ["site", "add", "hospital-z"],
        ["study", "status", "st_1"],
    ],
)
def test_an_unreachable_orchestrator_is_one_line_with_what_to_check(credential, args):
    line = one_error(cli(*args, "--credential", credential), 1)
    assert "cannot reach the orchestrator at https://127.0.0.1:" in line
    assert "is `fedhealth orchestrator serve` running there?" in line


def test_a_missing_credential_file_says_where_one_comes_from(tmp_path):
    line = one_error(cli("study", "list", "--credential", tmp_path / "nope.credential"), 1)
    assert "nope.credential not found" in line
    assert "orchestrator init" in line


def test_orchestrator_serve_on_a_port_in_use_is_one_line(tmp_path):
    home = tmp_path / "orch"
    assert cli("orchestrator", "init", home, "--host", "127.0.0.1").exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_error(cli("orchestrator", "serve", "--home", home, "--port", port), 1)
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in line


def test_site_enroll_without_the_ca_file_says_where_it_comes_from(tmp_path):
    token = tmp_path / "a.token"
    token.write_text("fhe_" + "x" * 30 + "\n")
    args = ["--orchestrator", "https://127.0.0.1:9", "--token-file", token, "--name", "a"]
    line = one_error(cli("site", "enroll", *args, "--ca", tmp_path / "ca.pem", "--home", tmp_path / "h"), 1)
    assert "CA file" in line
    assert "ca.pem from the orchestrator's home" in line


def _enroll(tmp_path, *args: object, stdin: str | None = None) -> Any:
    base = ["site", "enroll", "--orchestrator", "https://127.0.0.1:9", "--name", "a"]
    where = ["--ca", tmp_path / "missing-ca.pem", "--home", tmp_path / "h"]
    return runner.invoke(app, [str(a) for a in (*base, *args, *where)], input=stdin)


def test_site_enroll_reads_the_token_from_standard_input_and_warns_about_one_on_the_command_line(tmp_path):
    piped = _enroll(tmp_path, stdin="fhe_" + "x" * 30 + "\n")  # the token read, on to the CA check
    assert "CA file" in one_error(piped, 1)
    given = _enroll(tmp_path, "--token", "fhe_" + "x" * 30)
    assert given.exit_code == 1
    assert "warning: --token puts the enrollment token where every local account can read it" in given.stderr
    assert "CA file" in given.stderr


def test_site_enroll_without_a_token_or_with_two_is_a_usage_error_in_one_line(tmp_path):
    assert "no enrollment token" in one_error(_enroll(tmp_path, stdin=""), 2)
    token = tmp_path / "a.token"
    token.write_text("fhe_" + "x" * 30)
    both = _enroll(tmp_path, "--token-file", token, "--token", "fhe_" + "y" * 30)
    assert "give the enrollment token once" in one_error(both, 2)
    missing = one_error(_enroll(tmp_path, "--token-file", tmp_path / "nope.token"), 1)
    assert "cannot read the enrollment token from" in missing


# --- spec files --------------------------------------------------------------------------------------------


def test_study_init_writes_a_template_that_hashes_once_its_fields_are_set(tmp_path):
    out = tmp_path / "study.toml"
    args = ["--recipe", "logreg", "--dataset", "cohort", "--site", "b", "--site", "a", "--features", "3"]
    assert cli("study", "init", *args, "--out", out).exit_code == 0
    text = out.read_text()
    assert "# " in text  # commented
    assert 'train_sites = ["a", "b"]' in text
    digest = cli("study", "hash", out)
    assert digest.exit_code == 0, digest.output
    assert len(digest.stdout.strip()) == 64
    again = cli("study", "init", *args, "--out", out)
    assert "exists already" in one_error(again, 1)


def test_study_init_with_column_names_writes_them_into_the_spec_in_order(tmp_path):
    from fedhealth.client import load_spec

    out = tmp_path / "study.toml"
    args = ["--recipe", "logreg", "--dataset", "cohort", "--site", "a", "--features", "age, sbp,chol"]
    assert cli("study", "init", *args, "--out", out).exit_code == 0
    spec = load_spec(out)
    assert spec.recipe.params["feature_names"] == ["age", "sbp", "chol"]
    assert spec.recipe.params["n_features"] == 3


@pytest.mark.parametrize(
    ("recipe", "features", "words"),
    [
        ("logreg", "age,,chol", "not a list of distinct column names"),
        ("logreg", "age,age", "not a list of distinct column names"),
        ("logreg", "0", "must be at least 1"),
        ("stats", "age,chol", "takes no feature names"),
    ],
)
def test_study_init_refuses_bad_feature_columns_in_one_line(tmp_path, recipe, features, words):
    out = tmp_path / "study.toml"
    args = ["--recipe", recipe, "--dataset", "cohort", "--site", "a", "--features", features, "--out", out]
    assert words in one_error(cli("study", "init", *args), 1)
    assert not out.exists()


def test_an_invalid_spec_file_names_the_field_and_the_rule_in_words(tmp_path):
    out = tmp_path / "study.toml"
    cli(
        "study",
        "init",
        "--recipe",
        "logreg",
        "--dataset",
        "cohort",
        "--site",
        "a",
        "--features",
        "3",
        "--out",
        out,
    )
    out.write_text(
        out.read_text().replace("rounds = 5", "rounds = 0").replace('name = "my-study"', 'name = "My Study"')
    )
    line = one_error(cli("study", "hash", out), 1)
    assert "field name: must be lowercase letters, digits, '-', '_' or '.'" in line
    assert "field rounds: must be at least 1" in line
    assert "[a-z0-9]" not in line  # a rule in words, not a regular expression


# --- datasets at the site ----------------------------------------------------------------------------------


def test_a_csv_with_a_text_id_column_is_registered_with_the_id_declared(site_home, cohort):
    result = cli(
        "site",
        "dataset",
        "add",
        "cohort",
        cohort,
        "--label",
        "target",
        "--id",
        "patient_id",
        "--home",
        site_home,
    )
    assert result.exit_code == 0, result.output
    assert "30 rows, 3 features, label target, id patient_id" in result.stdout
    listed = cli("site", "dataset", "list", "--home", site_home, "--json")
    (entry,) = json.loads(listed.stdout)
    assert entry["features"] == ["age", "bp", "chol"]  # the id column never becomes a feature


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            "no-id",
            "column 'patient_id' holds 'P000', not a number "
            "(if 'patient_id' identifies patients, declare it with --id patient_id",
        ),
        ("no-label", "label column 'outcome' is not in the header"),
        ("text-feature", "column 'bp' holds 'high', not a number"),
        ("absent", "does not exist"),
    ],
)
def test_a_bad_dataset_is_refused_at_add_and_nothing_is_registered(
    site_home, cohort, tmp_path, change, words
):
    label, id_column, path = "target", "patient_id", cohort
    if change == "no-id":
        id_column = None
    elif change == "no-label":
        label = "outcome"
    elif change == "text-feature":
        path = write_csv(
            tmp_path / "text.csv", ["patient_id", "bp", "target"], [["P1", "high", 1], ["P2", "low", 0]]
        )
    elif change == "absent":
        path = tmp_path / "absent.csv"
    args = ["site", "dataset", "add", "cohort", path, "--label", label, "--home", site_home]
    if id_column is not None:
        args += ["--id", id_column]
    line = one_error(cli(*args), 1)
    assert words in line
    assert line.startswith("error: dataset 'cohort': ")
    assert not (site_home / "datasets.json").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("deleted", "does not exist"),
        ("label-dropped", "label column 'target' is not in the header"),
        ("text-feature", "column 'chol' holds 'n/a', not a number"),
    ],
)
def test_site_serve_refuses_to_start_on_a_dataset_that_no_longer_checks(site_home, cohort, change, words):
    added = cli(
        "site",
        "dataset",
        "add",
        "cohort",
        cohort,
        "--label",
        "target",
        "--id",
        "patient_id",
        "--home",
        site_home,
    )
    assert added.exit_code == 0, added.output
    if change == "deleted":
        cohort.unlink()
    elif change == "label-dropped":
        cohort.write_text(cohort.read_text().replace(",target\n", ",outcome\n", 1))
    else:
        lines = cohort.read_text().splitlines()
        cells = lines[3].split(",")
        cells[3] = "n/a"
        lines[3] = ",".join(cells)
        cohort.write_text("\n".join(lines) + "\n")
    # the orchestrator named in the home is not running: the agent stops before ever contacting it
    line = one_error(cli("site", "serve", "--home", site_home), 1)
    assert words in line
    assert "cannot reach" not in line


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("ftp://data/x.csv", "no connector for scheme 'ftp'"),
        ("file:///nonexistent/x.csv?label=y", "does not exist"),
        ("file:///nonexistent/x.csv", "missing required parameter(s) ['label']"),
    ],
)
def test_site_serve_refuses_a_bad_dataset_override_at_start(site_home, uri, words):
    line = one_error(cli("site", "serve", "--home", site_home, "--dataset", f"cohort={uri}"), 1)
    assert words in line


def test_approve_without_show_is_refused(site_home):
    from fedhealth.agent import SiteHome
    from fedhealth.agent._governance import SiteGovernance
    from support import breast_spec

    spec = breast_spec(["hospital-a"], rounds=1, name="unread")
    with SiteGovernance(SiteHome(site_home)) as governance:
        digest = governance.submit(spec).spec_hash
    line = one_error(cli("site", "approve", digest, "--reason", "ok", "--home", site_home, "--no-report"), 1)
    assert "has not been shown at this site" in line
    assert cli("site", "approvals", "show", digest, "--home", site_home, "--offline").exit_code == 0
    result = cli("site", "approve", digest, "--reason", "ok", "--home", site_home, "--no-report")
    assert result.exit_code == 0, result.output


def test_model_predict_on_a_file_of_another_width_says_what_the_model_expects(tmp_path, cohort):
    from fedhealth.core import encode_tensors

    model = tmp_path / "model.safetensors"
    model.write_bytes(encode_tensors({"weight": np.ones(5, np.float32), "bias": np.zeros(1, np.float32)}))
    line = one_error(cli("model", "predict", "--model", model, "--csv", cohort, "--id", "patient_id"), 1)
    assert "4 feature column(s) (age, bp, chol, target); the model expects 5" in line
    assert "Traceback" not in line


def test_model_predict_on_a_missing_model_is_one_line(tmp_path, cohort):
    line = one_error(cli("model", "predict", "--model", tmp_path / "none.safetensors", "--csv", cohort), 1)
    assert "no such model file" in line


def test_site_check_against_an_unreachable_orchestrator_reports_each_failure(site_home, cohort):
    (site_home / "ca.pem").write_bytes(create_ca("test federation").cert_pem)
    cli(
        "site",
        "dataset",
        "add",
        "cohort",
        cohort,
        "--label",
        "target",
        "--id",
        "patient_id",
        "--home",
        site_home,
    )
    result = cli("site", "check", "--home", site_home, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["readiness"]["checks"]}
    assert checks["orchestrator.dns"]["status"] == "ok"
    assert checks["orchestrator.tls"]["status"] == "fail"
    assert checks["orchestrator.tls"]["note"] == "no TLS connection to the orchestrator"
    assert {checks[n]["status"] for n in ("orchestrator.login", "network.download", "clock.skew")} == {
        "skipped"
    }
    # what this machine can measure is measured all the same
    assert checks["compute.logreg"]["status"] == "ok"
    assert checks["dataset:cohort"]["status"] == "ok"
    assert report["sent"] is False
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "orchestrator.tls" in errors[0]
    assert "Traceback" not in result.output


def test_an_error_line_shows_control_characters_instead_of_letting_the_terminal_act_on_them():
    """An error line can carry the orchestrator's or a data source's words: an escape sequence there must
    not clear the screen, retitle the window or recolour what the steward reads."""
    from fedhealth.cli._errors import error_line

    line = error_line("refused: \x1b[2J\x1b]0;pwned\x07 by the server\x08\x08é", hint="see \x1b[31mhere")
    assert not any(not ch.isprintable() for ch in line)
    assert "\\x1b[2J" in line
    assert "\\x07" in line
    assert line.endswith("(see \\x1b[31mhere)")
    assert "é" in line  # printable text is kept as it is
