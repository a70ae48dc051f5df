"""Hostile input at every command (README: "Every command prints one line `error: <what> (<hint>)` when it
fails: exit code 1 for a failure, 2 for a usage error"): malformed numbers (nan, inf, -1, 1e400, huge
integers), ports out of range, durations past the orchestrator's bound, dates without an offset or out of
range, wrong-type, empty, binary, FIFO and folder files where a file is expected, a home of the wrong kind,
and names with unicode tricks (a right-to-left override, a zero-width space, digits of another script).

Each case runs through typer's CliRunner and must print exactly one ``error:`` line that names the problem,
exit non-zero (the documented code), show no traceback and leave every file of the world as it was: no
half-written federation, no created database, no signing key, no registered dataset or consent record.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.crypto import IdentityKey, create_ca
from support import closed_port, unreachable_credential

runner = CliRunner()
USAGE, FAILURE = 2, 1
HASH = "a" * 64
RLO, ZWSP = "\u202e", "\u200b"  # right-to-left override, zero-width space
NINES = "9" * 400  # float() of it is inf


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch):
    """A bad input that slipped through would start a server, an agent or the demo and never return: make
    that an immediate failure instead of a hang."""
    import fedhealth.agent
    import fedhealth.cli._demo
    import fedhealth.dashboard
    import fedhealth.orchestrator

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bad input was accepted: the service started")

    monkeypatch.setattr(fedhealth.orchestrator, "serve", started)
    monkeypatch.setattr(fedhealth.agent, "run_agent", started)
    monkeypatch.setattr(fedhealth.dashboard, "serve_site_dashboard", started)
    monkeypatch.setattr(fedhealth.cli._demo, "run_demo", started)
    monkeypatch.delenv("FEDHEALTH_CREDENTIAL", raising=False)
    monkeypatch.delenv("FEDHEALTH_DATABASE_URL", raising=False)
    monkeypatch.delenv("FEDHEALTH_DEBUG", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """An orchestrator home, an enrolled site home (its governance database made), an operator credential,
    a dataset, a spec and a drawer of bad files. Each case must leave all of it exactly as it was."""
    from fedhealth.agent import SiteHome
    from fedhealth.agent._governance import SiteGovernance

    w = tmp_path_factory.mktemp("world")
    assert runner.invoke(app, ["orchestrator", "init", str(w / "orch"), "--host", "127.0.0.1"]).exit_code == 0
    ca = create_ca("test federation")
    (w / "ca.pem").write_bytes(ca.cert_pem)
    unreachable_credential(w / "admin.credential")
    site = w / "site"
    site.mkdir(mode=0o700)
    IdentityKey.generate().save(site / "identity.key")
    (site / "site.json").write_text(
        json.dumps({"site": "hospital-a", "orchestrator": f"https://127.0.0.1:{closed_port()}"})
    )
    (site / "site.json").chmod(0o600)
    (site / "ca.pem").write_bytes(ca.cert_pem)
    with SiteGovernance(SiteHome(site)):
        pass  # the site's database exists, so a refused command cannot pass off creating it as harmless
    rng = np.random.default_rng(0)
    rows = [[f"P{i:03d}", *np.round(rng.normal(size=3), 3), i % 2] for i in range(30)]
    lines = [",".join(map(str, r)) for r in [["patient_id", "age", "bp", "chol", "target"], *rows]]
    (w / "cohort.csv").write_text("\n".join(lines) + "\n")
    args = ["--recipe", "logreg", "--dataset", "cohort", "--site", "hospital-a", "--features", "age,bp,chol"]
    assert runner.invoke(app, ["study", "init", *args, "--out", str(w / "study.toml")]).exit_code == 0
    (w / "empty").write_text("")
    (w / "empty.json").write_text("")
    (w / "list.json").write_text("[1, 2]")
    (w / "obj.json").write_text('{"kind": "federated-statistics", "strata": 5}')
    (w / "garbage.bin").write_bytes(b"\xff\xfe\x00 not text")
    (w / "garbage.json").write_bytes(b"\xff\xfe\x00 not text")
    (w / "folder").mkdir()
    os.mkfifo(w / "fifo")
    (w / "token").write_text("fhe_" + "x" * 30 + "\n")
    for name, body in (("list.credential", "[1, 2]"), ("empty.credential", "")):
        (w / name).write_text(body)
        (w / name).chmod(0o600)
    head = "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at\n"
    (w / "naive.csv").write_text(head + "p1,research,permit,2025-01-01T00:00:00,,\n")
    (w / "before-year-1.csv").write_text(head + "p1,research,permit,0001-01-01T00:00:00+01:00,,\n")
    (w / "year-99999.csv").write_text(head + "p1,research,permit,99999-01-01,,\n")
    (w / "e400.csv").write_text("patient_id,age,target\nP1,1e400,1\nP2,2,0\nP3,1,1\n")
    return w


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root``: its kind and mode, a regular file's bytes, a database's rows (SQLite's
    -wal and -shm files come and go with reading; what matters is what the database holds)."""
    seen: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if name.endswith(("-wal", "-shm", "-journal")):
                continue
            st = path.lstat()
            key = str(path.relative_to(root))
            if path.is_symlink() or not path.is_file():
                seen[key] = (st.st_mode,)
            elif name.endswith(".sqlite"):
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                    seen[key] = (st.st_mode, "\n".join(conn.iterdump()))
                conn.close()
            else:
                seen[key] = (st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def one_error(result: Any, code: int) -> str:
    """Exactly one ``error:`` line on stderr, no traceback, the documented exit code."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]  # a known problem, not "a bug; report it"
    return lines[0]


ORCH, S, C, W = "{orch}", "{site}", "{credential}", "{w}"
SERVE = ["orchestrator", "serve", "--home", ORCH, "--port", "0"]
ENROLL = ["site", "enroll", "--orchestrator", "https://127.0.0.1:9", "--ca", f"{W}/ca.pem"]
ENROLL_TAIL = ["--token-file", f"{W}/token", "--home", f"{W}/new-site"]
INIT = ["study", "init", "--recipe", "logreg", "--dataset", "cohort", "--site", "hospital-a"]
APPROVE = ["site", "approve", "abcdef12", "--reason", "IRB", "--home", S, "--no-report"]
ANCHOR = ["audit", "verify", "--home", ORCH, "--anchor"]

# (id, arguments, exit code, words the error line must hold)
CASES: list[tuple[str, list[str], int, str]] = [
    # orchestrator init: nothing of a federation is written for a bad option
    ("init-port-negative", ["orchestrator", "init", f"{W}/new", "--port", "-1"], USAGE, "--port"),
    ("init-port-too-high", ["orchestrator", "init", f"{W}/new", "--port", "70000"], USAGE, "--port"),
    ("init-port-huge", ["orchestrator", "init", f"{W}/new", "--port", "9" * 30], USAGE, "--port"),
    ("init-host-empty", ["orchestrator", "init", f"{W}/new", "--host", ""], USAGE, "--host"),
    ("init-host-space", ["orchestrator", "init", f"{W}/new", "--host", "fl example.org"], USAGE, "--host"),
    ("init-host-rlo", ["orchestrator", "init", f"{W}/new", "--host", f"fl{RLO}gro.elpmaxe"], USAGE, "--host"),
    # "$" matches before a final newline: a check written with it let "fl.example.org\n" through
    (
        "init-host-newline",
        ["orchestrator", "init", f"{W}/new", "--host", "fl.example.org\n"],
        USAGE,
        "--host",
    ),
    ("init-url-garbage", ["orchestrator", "init", f"{W}/new", "--url", "not a url"], USAGE, "--url"),
    ("init-url-bracket", ["orchestrator", "init", f"{W}/new", "--url", "https://[::1"], USAGE, "--url"),
    ("init-url-port", ["orchestrator", "init", f"{W}/new", "--url", "https://h:99999"], USAGE, "--url"),
    (
        "init-db-garbage",
        ["orchestrator", "init", f"{W}/new", "--database-url", "nonsense"],
        USAGE,
        "--database-url",
    ),
    (
        "init-db-dialect",
        ["orchestrator", "init", f"{W}/new", "--database-url", "nope://x"],
        USAGE,
        "--database-url",
    ),
    ("init-home-is-a-file", ["orchestrator", "init", f"{W}/cohort.csv"], FAILURE, "cohort.csv"),
    ("init-home-taken", ["orchestrator", "init", ORCH], FAILURE, "already holds a federation"),
    # orchestrator serve: refused before the home is touched or a port is bound
    ("serve-port-negative", ["orchestrator", "serve", "--home", ORCH, "--port", "-1"], USAGE, "--port"),
    ("serve-port-too-high", ["orchestrator", "serve", "--home", ORCH, "--port", "70000"], USAGE, "--port"),
    ("serve-enroll-port", [*SERVE, "--enroll-port", "-5"], USAGE, "--enroll-port"),
    ("serve-metrics-port", [*SERVE, "--metrics-port", "70000"], USAGE, "--metrics-port"),
    ("serve-body-negative", [*SERVE, "--max-body-mb", "-1"], USAGE, "--max-body-mb"),
    ("serve-body-zero", [*SERVE, "--max-body-mb", "0"], USAGE, "--max-body-mb"),
    ("serve-body-huge", [*SERVE, "--max-body-mb", "9" * 30], USAGE, "--max-body-mb"),
    ("serve-rate-nan", [*SERVE, "--rate-limit", "nan"], USAGE, "--rate-limit"),
    ("serve-rate-inf", [*SERVE, "--rate-limit", "inf"], USAGE, "--rate-limit"),
    ("serve-rate-1e400", [*SERVE, "--rate-limit", "1e400"], USAGE, "--rate-limit"),
    ("serve-rate-negative", [*SERVE, "--rate-limit", "-1"], USAGE, "--rate-limit"),
    ("serve-wait-inf", [*SERVE, "--approval-wait", NINES + "d"], USAGE, "--approval-wait"),
    ("serve-wait-past-bound", [*SERVE, "--approval-wait", "400d"], USAGE, "--approval-wait"),
    ("serve-wait-arabic-digits", [*SERVE, "--approval-wait", "\u0663d"], USAGE, "--approval-wait"),
    ("serve-drift-nan", [*SERVE, "--drift-warn", "nan"], USAGE, "--drift-warn"),
    ("serve-db-garbage", [*SERVE, "--database-url", "nonsense"], USAGE, "--database-url"),
    (
        "serve-site-home",
        ["orchestrator", "serve", "--home", S, "--port", "0"],
        FAILURE,
        "not an orchestrator home",
    ),
    (
        "serve-file-home",
        ["orchestrator", "serve", "--home", f"{W}/cohort.csv"],
        FAILURE,
        "not an orchestrator home",
    ),
    # site serve, site dashboard
    ("agent-poll-nan", ["site", "serve", "--home", S, "--poll-wait", "nan"], USAGE, "--poll-wait"),
    ("agent-poll-inf", ["site", "serve", "--home", S, "--poll-wait", "inf"], USAGE, "--poll-wait"),
    ("agent-poll-negative", ["site", "serve", "--home", S, "--poll-wait", "-1"], USAGE, "--poll-wait"),
    ("agent-url", ["site", "serve", "--home", S, "--orchestrator", "https://[::1"], USAGE, "--orchestrator"),
    ("agent-orchestrator-home", ["site", "serve", "--home", ORCH], FAILURE, "not an enrolled site"),
    ("dashboard-port", ["site", "dashboard", "--home", S, "--port", "-1"], USAGE, "--port"),
    ("dashboard-port-high", ["site", "dashboard", "--home", S, "--port", "65536"], USAGE, "--port"),
    # site enroll: nothing is made at --home
    (
        "enroll-url",
        [
            "site",
            "enroll",
            "--orchestrator",
            "https://[::1",
            "--ca",
            f"{W}/ca.pem",
            "--name",
            "a",
            *ENROLL_TAIL,
        ],
        USAGE,
        "--orchestrator",
    ),
    ("enroll-name-empty", [*ENROLL, "--name", "", *ENROLL_TAIL], USAGE, "--name"),
    ("enroll-name-rlo", [*ENROLL, "--name", f"hospital{RLO}a", *ENROLL_TAIL], USAGE, "--name"),
    ("enroll-name-zwsp", [*ENROLL, "--name", f"hospital{ZWSP}a", *ENROLL_TAIL], USAGE, "--name"),
    ("enroll-name-newline", [*ENROLL, "--name", "hospital-a\n", *ENROLL_TAIL], USAGE, "--name"),
    (
        "enroll-ca-binary",
        [
            "site",
            "enroll",
            "--orchestrator",
            "https://127.0.0.1:9",
            "--ca",
            f"{W}/garbage.bin",
            "--name",
            "a",
            *ENROLL_TAIL,
        ],
        FAILURE,
        "garbage.bin",
    ),
    (
        "enroll-token-binary",
        [*ENROLL, "--name", "a", "--token-file", f"{W}/garbage.bin", "--home", f"{W}/new-site"],
        FAILURE,
        "enrollment token",
    ),
    (
        "enroll-home-is-a-file",
        [*ENROLL, "--name", "a", "--token-file", f"{W}/token", "--home", f"{W}/cohort.csv"],
        FAILURE,
        "not a folder",
    ),
    # operator credential and URL
    ("credential-folder", ["site", "list", "--credential", f"{W}/folder"], FAILURE, "folder"),
    (
        "credential-wrong-json",
        ["site", "list", "--credential", f"{W}/list.credential"],
        FAILURE,
        "not a fedhealth credential",
    ),
    (
        "credential-empty",
        ["user", "list", "--credential", f"{W}/empty.credential"],
        FAILURE,
        "not a fedhealth credential",
    ),
    ("credential-fifo", ["study", "list", "--credential", f"{W}/fifo"], FAILURE, "not a regular file"),
    (
        "operator-url",
        ["site", "list", "--credential", C, "--orchestrator", "https://[::1"],
        USAGE,
        "--orchestrator",
    ),
    # study init: nothing written from a field the spec refuses
    (
        "init-features-superscript",
        [*INIT, "--features", "\u00b2", "--out", f"{W}/new.toml"],
        FAILURE,
        "--features",
    ),
    (
        "init-features-fullwidth",
        [*INIT, "--features", "\uff13", "--out", f"{W}/new.toml"],
        FAILURE,
        "--features",
    ),
    ("init-rounds-huge", [*INIT, "--rounds", "9" * 30, "--out", f"{W}/new.toml"], FAILURE, "rounds"),
    ("init-rounds-zero", [*INIT, "--rounds", "0", "--out", f"{W}/new.toml"], USAGE, "--rounds"),
    ("init-site-space", [*INIT, "--site", "a b", "--out", f"{W}/new.toml"], FAILURE, "train_sites"),
    (
        "init-dataset-path",
        ["study", "init", "--recipe", "logreg", "--dataset", "../x", "--out", f"{W}/new.toml"],
        FAILURE,
        "dataset",
    ),
    ("init-name-rlo", [*INIT, "--name", f"pilot{RLO}", "--out", f"{W}/new.toml"], FAILURE, "name"),
    ("init-out-folder", [*INIT, "--out", f"{W}/folder"], FAILURE, "exists already"),
    # spec files
    ("hash-folder", ["study", "hash", f"{W}/folder"], USAGE, "directory"),
    ("hash-empty", ["study", "hash", f"{W}/empty"], FAILURE, "is required"),
    ("hash-wrong-type", ["study", "hash", f"{W}/list.json"], FAILURE, "a study spec is an object"),
    ("hash-binary", ["study", "hash", f"{W}/garbage.bin"], FAILURE, "cannot be read"),
    ("hash-fifo", ["study", "hash", f"{W}/fifo"], FAILURE, "fifo"),
    (
        "submit-wait-inf",
        ["study", "submit", f"{W}/study.toml", "--credential", C, "--approval-wait", NINES + "d"],
        USAGE,
        "--approval-wait",
    ),
    (
        "submit-wait-past-bound",
        ["study", "submit", f"{W}/study.toml", "--credential", C, "--approval-wait", "367d"],
        USAGE,
        "--approval-wait",
    ),
    (
        "submit-no-credential",
        ["study", "submit", f"{W}/study.toml", "--credential", f"{W}/none.credential"],
        FAILURE,
        "not found",
    ),
    (
        "submit-bad-url",
        ["study", "submit", f"{W}/study.toml", "--credential", C, "--orchestrator", "ftp://x"],
        USAGE,
        "--orchestrator",
    ),
    (
        "stats-run-bad-url",
        ["stats", "run", f"{W}/study.toml", "--credential", C, "--orchestrator", "https://[::1"],
        USAGE,
        "--orchestrator",
    ),
    ("stats-run-folder", ["stats", "run", f"{W}/folder", "--credential", C], USAGE, "directory"),
    (
        "status-interval-nan",
        ["study", "status", "st_1", "--credential", C, "--watch", "--interval", "nan"],
        USAGE,
        "--interval",
    ),
    # privacy and the site's budget: no ledger created or changed
    (
        "budget-epsilon-nan-new-db",
        [
            "site",
            "budget",
            "set",
            "cohort",
            "--epsilon",
            "nan",
            "--delta",
            "1e-5",
            "--site-db",
            f"{W}/new.sqlite",
        ],
        USAGE,
        "epsilon",
    ),
    (
        "budget-dataset-newline",
        [
            "site",
            "budget",
            "set",
            "cohort\n",
            "--epsilon",
            "3",
            "--delta",
            "1e-5",
            "--site-db",
            f"{W}/new.sqlite",
        ],
        USAGE,
        "dataset name",
    ),
    (
        "budget-epsilon-inf",
        ["site", "budget", "set", "cohort", "--epsilon", "inf", "--delta", "1e-5", "--home", S],
        USAGE,
        "epsilon",
    ),
    (
        "budget-epsilon-1e400",
        ["site", "budget", "set", "cohort", "--epsilon", "1e400", "--delta", "1e-5", "--home", S],
        USAGE,
        "epsilon",
    ),
    (
        "budget-epsilon-negative",
        ["site", "budget", "set", "cohort", "--epsilon", "-1", "--delta", "1e-5", "--home", S],
        USAGE,
        "epsilon",
    ),
    (
        "budget-delta-one",
        ["site", "budget", "set", "cohort", "--epsilon", "1", "--delta", "1", "--home", S],
        USAGE,
        "delta",
    ),
    (
        "budget-dataset-rlo",
        ["site", "budget", "set", f"cohort{RLO}", "--epsilon", "1", "--delta", "1e-5", "--home", S],
        USAGE,
        "dataset name",
    ),
    (
        "budget-db-not-sqlite",
        ["site", "budget", "show", "--site-db", f"{W}/cohort.csv"],
        FAILURE,
        "not a database",
    ),
    (
        "privacy-rate-nan",
        ["privacy", "epsilon", "--sigma", "1", "--sample-rate", "nan", "--steps", "10", "--delta", "1e-5"],
        USAGE,
        "sample rate",
    ),
    (
        "privacy-target-inf",
        [
            "privacy",
            "calibrate",
            "--epsilon",
            "inf",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.1",
            "--steps",
            "10",
        ],
        USAGE,
        "epsilon",
    ),
    (
        "check-transfer-nan",
        ["site", "check", "--home", S, "--transfer-mb", "nan", "--no-report"],
        USAGE,
        "--transfer-mb",
    ),
    # audit logs and commitments
    (
        "verify-key-binary-file",
        ["audit", "verify", "--home", ORCH, "--key", f"{W}/garbage.bin"],
        USAGE,
        "--key",
    ),
    ("verify-anchor-negative", [*ANCHOR, f"-1:{HASH}"], USAGE, "--anchor"),
    ("verify-anchor-arabic-digit", [*ANCHOR, f"\u0663:{HASH}"], USAGE, "--anchor"),
    (
        "verify-home-wrong-kind",
        ["audit", "verify", "--home", f"{W}/folder"],
        FAILURE,
        "neither an orchestrator home nor a site home",
    ),
    ("commitments-empty", ["audit", "verify-commitments", f"{W}/empty"], FAILURE, "not JSON"),
    ("commitments-binary", ["audit", "verify-commitments", f"{W}/garbage.bin"], FAILURE, "not JSON"),
    ("commitments-csv", ["audit", "verify-commitments", f"{W}/cohort.csv"], FAILURE, "not JSON"),
    (
        "commitments-wrong-type",
        ["audit", "verify-commitments", f"{W}/list.json"],
        FAILURE,
        "not a revelation",
    ),
    # the steward's decision on a spec file: nothing recorded
    ("approve-spec-binary", [*APPROVE, "--spec", f"{W}/garbage.json"], FAILURE, "garbage.json"),
    ("approve-spec-empty-json", [*APPROVE, "--spec", f"{W}/empty.json"], FAILURE, "not valid JSON"),
    ("approve-spec-wrong-type", [*APPROVE, "--spec", f"{W}/list.json"], FAILURE, "a study spec is an object"),
    ("approve-spec-fifo", [*APPROVE, "--spec", f"{W}/fifo"], FAILURE, "fifo"),
    (
        "reject-spec-csv",
        [
            "site",
            "reject",
            "abcdef12",
            "--reason",
            "no",
            "--home",
            S,
            "--no-report",
            "--spec",
            f"{W}/cohort.csv",
        ],
        FAILURE,
        "not valid TOML",
    ),
    (
        "approve-hash-short",
        ["site", "approve", "zz", "--reason", "IRB", "--home", S, "--no-report"],
        FAILURE,
        "8 hex characters",
    ),
    (
        "approve-orchestrator-home",
        ["site", "approve", "abcdef12", "--reason", "IRB", "--home", ORCH, "--no-report"],
        FAILURE,
        "not an enrolled site",
    ),
    # consent dates, datasets
    (
        "consent-date-no-offset",
        ["site", "consent", "import", f"{W}/naive.csv", "--home", S],
        FAILURE,
        "no UTC offset",
    ),
    (
        "consent-date-before-year-1",
        ["site", "consent", "import", f"{W}/before-year-1.csv", "--home", S],
        FAILURE,
        "outside the years 1 to 9999",
    ),
    (
        "consent-date-year-99999",
        ["site", "consent", "import", f"{W}/year-99999.csv", "--home", S],
        FAILURE,
        "valid_from",
    ),
    (
        "consent-binary",
        ["site", "consent", "import", f"{W}/garbage.bin", "--home", S, "--format", "fhir"],
        FAILURE,
        "not JSON",
    ),
    (
        "dataset-name-zwsp",
        [
            "site",
            "dataset",
            "add",
            f"coh{ZWSP}ort",
            f"{W}/cohort.csv",
            "--label",
            "target",
            "--id",
            "patient_id",
            "--home",
            S,
        ],
        FAILURE,
        "dataset name",
    ),
    (
        "dataset-value-1e400",
        [
            "site",
            "dataset",
            "add",
            "cohort",
            f"{W}/e400.csv",
            "--label",
            "target",
            "--id",
            "patient_id",
            "--home",
            S,
        ],
        FAILURE,
        "not a finite number",
    ),
    (
        "dataset-schema-wrong-type",
        [
            "site",
            "dataset",
            "add",
            "cohort",
            f"{W}/cohort.csv",
            "--label",
            "target",
            "--id",
            "patient_id",
            "--schema",
            f"{W}/list.json",
            "--home",
            S,
        ],
        FAILURE,
        "schema",
    ),
    (
        "dataset-classes-huge",
        [
            "site",
            "dataset",
            "add",
            "cohort",
            f"{W}/cohort.csv",
            "--label",
            "target",
            "--classes",
            "9" * 30,
            "--home",
            S,
        ],
        USAGE,
        "--classes",
    ),
    ("dataset-home-wrong-kind", ["site", "dataset", "list", "--home", ORCH], FAILURE, "not an enrolled site"),
    # models, statistics reports, the demo
    (
        "predict-model-binary",
        ["model", "predict", "--model", f"{W}/garbage.bin", "--csv", f"{W}/cohort.csv"],
        FAILURE,
        "not a fedhealth model",
    ),
    (
        "predict-model-folder",
        ["model", "predict", "--model", f"{W}/folder", "--csv", f"{W}/cohort.csv"],
        FAILURE,
        "directory",
    ),
    (
        "scaling-wrong-type",
        ["model", "scaling", f"{W}/list.json"],
        FAILURE,
        "not a federated statistics report",
    ),
    ("stats-show-wrong-shape", ["stats", "show", f"{W}/list.json"], FAILURE, "not a statistics report"),
    ("demo-rounds-zero", ["demo", "--rounds", "0", "--out", f"{W}/demo"], USAGE, "--rounds"),
    ("demo-rounds-negative", ["demo", "--rounds", "-1", "--out", f"{W}/demo"], USAGE, "--rounds"),
    ("demo-rounds-huge", ["demo", "--rounds", "9" * 30, "--out", f"{W}/demo"], USAGE, "--rounds"),
]


@pytest.mark.parametrize(("args", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line_and_changes_nothing(world, args, code, words):
    values = {"{orch}": world / "orch", "{site}": world / "site", "{credential}": world / "admin.credential"}
    argv = []
    for arg in args:
        for placeholder, path in values.items():
            arg = arg.replace(placeholder, str(path))
        argv.append(arg.replace("{w}", str(world)))
    before = snapshot(world)
    line = one_error(runner.invoke(app, argv), code)
    assert words.lower() in line.lower(), line
    after = snapshot(world)
    assert after == before, sorted(set(after) ^ set(before)) or "a file's content or mode changed"
