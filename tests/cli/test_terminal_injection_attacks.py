"""Terminal and display injection: whatever another party wrote reaches the terminal made visible, never
interpreted (docs/security.md, "What another party wrote reaches the terminal escaped").

The attackers: a researcher or orchestrator writing a study spec (its description, its recipe params), a
malicious orchestrator (every string of its answers: study ids, reasons, site and user names, versions, a
model card it rendered), a malicious site (a withdrawal notice id, a revelation file it hands an auditor, a
statistics report's names), another operator or steward (reasons, names). The victims read `site approvals
show` / `site approvals`, `site approve`, `study status` / `list` / `cancel`, `site list`, `site readiness`,
`user list`, `provenance show`, `model card`, `audit verify-commitments` and `stats show` on a terminal, or a
model card in a Markdown viewer.

Each test checks both halves: no character a terminal acts on (ESC, CSI, OSC, BEL, a carriage return, a
backspace, C1 controls), nor any bidi control or invisible character, reaches the output raw; and what was
written is still there to read, as its escape. The approval review shows every field of the spec, whole.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from fedhealth.crypto import IdentityKey
from support import breast_spec, cli

# One hostile string per trick; each would make a terminal (or a viewer) show something else than was sent.
TRICKS = {
    "erase and recolour (CSI)": "\x1b[2J\x1b[31m",
    "retitle the window (OSC)": "\x1b]0;pwned\x07",
    "a hidden hyperlink (OSC 8)": "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    "an 8-bit CSI (C1)": "\x9b2J",
    "overwrite the line (CR)": "rounds: 1\rrounds: 9",
    "rub out (backspace)": "approve\x08\x08\x08\x08\x08\x08\x08reject!",
    "reverse the text (RLO)": "\u202eevil\u202c",
    "bidi isolates": "\u2066x\u2067y\u2068z\u2069",
    "zero-width characters": "a\u200bb\u200c\u200d\u2060\ufeffc",
    "line and paragraph separators": "x\u2028y\u2029z",
    "tag characters": "\U000e0041\U000e0042",
    "a blank that is a letter": "\u3164",
}
HOSTILE = "".join(TRICKS.values())
# every character above that a terminal or a text renderer acts on, or that shows as nothing
DANGEROUS = frozenset(ch for ch in HOSTILE if not ch.isprintable() or ch == "\u3164")
# what each trick must look like once made visible
VISIBLE = [
    "\\x1b[2J",
    "\\x1b]0;pwned\\x07",
    "\\x9b",
    "\\r",
    "\\x08",
    "\\u202e",
    "\\u2066",
    "\\u200b",
    "\\u2028",
]
VISIBLE += ["\\ufeff", "\\U000e0041", "\\u3164"]
# rich markup, which Console.print would read: a hyperlink, and a closing tag that makes rich raise
MARKUP = "[link=https://evil.example/]hospital-a[/link][/]"


def assert_inert(text: str, *, allowed: str = "\n") -> None:
    """No character of ``text`` is one a terminal acts on, a bidi control or an invisible character."""
    raw = sorted({hex(ord(ch)) for ch in text if ch in DANGEROUS and ch not in allowed})
    assert not raw, f"reached the terminal raw: {raw}"
    others = sorted({hex(ord(ch)) for ch in text if not ch.isprintable() and ch not in allowed + "\t"})
    assert not others, f"non-printable characters reached the terminal: {others}"


def assert_visible(text: str) -> None:
    """Every trick is still there to read, as its escape."""
    missing = [v for v in VISIBLE if v not in text]
    assert not missing, f"not shown: {missing}"


# --- the one sanitizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_every_trick_is_shown_as_its_escape_and_printable_text_is_kept(trick):
    from fedhealth.cli._common import shown

    text = f"Étude 中文 ok {TRICKS[trick]} end"
    line = shown(text)
    assert_inert(line, allowed="")
    assert line.startswith("Étude 中文 ok ")  # printable text as it is
    assert line.endswith(" end")
    # each character that was hidden or acted on is there as its escape, in order: nothing dropped
    expected = "".join(
        ch.encode("unicode_escape").decode("ascii") if ch in DANGEROUS else ch for ch in TRICKS[trick]
    )
    assert f" {expected} " in line


def test_a_long_line_is_shown_whole():
    from fedhealth.cli._common import shown

    text = "x" * 100_000 + "END"
    assert shown(text) == text


# --- the data steward reviewing a spec ----------------------------------------------------------------------


@pytest.fixture
def site_home(tmp_path) -> Path:
    """A site home as `site enroll` leaves it (the orchestrator it names is not running)."""
    home = tmp_path / "site"
    home.mkdir(mode=0o700)
    IdentityKey.generate().save(home / "identity.key")
    (home / "site.json").write_text(json.dumps({"site": "hospital-a", "orchestrator": "https://127.0.0.1:1"}))
    (home / "site.json").chmod(0o600)
    return home


def _register(site_home: Path, spec: Any) -> str:
    from fedhealth.agent import SiteGovernance, SiteHome

    with SiteGovernance(SiteHome(site_home)) as governance:
        return governance.submit(spec).spec_hash


def _hostile_spec() -> Any:
    spec = breast_spec(
        ["hospital-a"], rounds=1, name="pilot", description=HOSTILE + " " + "y" * 3000 + " END"
    )
    recipe = spec.recipe.model_copy(
        update={
            "params": {**spec.recipe.params, "learning_rate": HOSTILE, HOSTILE: [HOSTILE, {"k": HOSTILE}]}
        }
    )
    return spec.model_copy(update={"recipe": recipe})


def test_a_spec_that_hides_part_of_itself_is_shown_whole_and_escaped_to_the_steward(site_home):
    """The description and recipe params carry escapes, carriage returns, backspaces, bidi overrides,
    zero-width characters and a very long line: `approvals show` shows every field of the spec (its JSON
    parses back to the spec registered) and the summary's description whole, with every trick visible."""
    spec = _hostile_spec()
    digest = _register(site_home, spec)
    result = cli("site", "approvals", "show", digest, "--home", site_home, "--offline")
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    body = result.stdout.split("\n\n", 2)[1]  # the header, the spec's JSON, the plain words
    assert json.loads(body) == spec.model_dump(mode="json")  # every field, exactly as it will be hashed
    summary = result.stdout.split("In plain words:", 1)[1]
    first = next(line for line in summary.splitlines() if line.startswith("  - Study "))
    assert_visible(first)  # the description, escaped, on its one line
    assert first.endswith(" END")  # whole: the long description is not cut
    # the recipe refused the hostile params: that sentence, which quotes them, is escaped too
    assert "NOT installed at this site" in summary or "Model:" in summary


def test_a_steward_reason_or_name_cannot_rewrite_the_approvals_list(site_home):
    """Another steward's reason and name (`--reason`, `--steward`) are shown escaped in `site approvals`:
    a carriage return in a reason cannot overwrite the status column of the line."""
    from fedhealth.agent import SiteGovernance, SiteHome

    spec = breast_spec(["hospital-a"], rounds=1, name="listed")
    with SiteGovernance(SiteHome(site_home)) as governance:
        digest = governance.approve(spec, reason="IRB-1" + HOSTILE, steward="dana" + HOSTILE).spec_hash
    result = cli("site", "approvals", "--home", site_home, "--offline")
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    [line] = [line for line in result.stdout.splitlines() if digest in line]
    assert line.startswith(f"{digest}  approved  listed ")
    assert_visible(line)


def test_what_the_orchestrator_says_when_syncing_approvals_is_escaped(site_home, monkeypatch):
    """A study id the orchestrator chose (quoted when its spec is refused) and the words of its error
    reach the steward's terminal escaped."""
    import fedhealth.agent as agent
    from fedhealth.agent import SyncResult
    from fedhealth.core import ServiceUnavailableError

    class Client:
        def close(self) -> None:
            pass

    monkeypatch.setattr(agent, "site_client", lambda home, **kw: Client())
    monkeypatch.setattr(
        agent,
        "sync_approvals",
        lambda governance, client: SyncResult(registered=(), reported=(), refused=(f"st_{HOSTILE}: bad",)),
    )
    refused = cli("site", "approvals", "--home", site_home)
    assert refused.exit_code == 0, refused.output
    assert "not registered" in refused.stderr
    assert_inert(refused.output)
    assert_visible(refused.stderr)

    def unreachable(governance: Any, client: Any) -> Any:
        raise ServiceUnavailableError(f"the orchestrator said {HOSTILE}")

    monkeypatch.setattr(agent, "sync_approvals", unreachable)
    failed = cli("site", "approvals", "--home", site_home)
    assert failed.exit_code == 0, failed.output
    assert "could not fetch" in failed.stderr
    assert_inert(failed.output)


def test_the_orchestrators_answer_to_an_approval_is_escaped(site_home, monkeypatch):
    import fedhealth.agent as agent
    from fedhealth.core import ServiceUnavailableError

    digest = _register(site_home, breast_spec(["hospital-a"], rounds=1, name="approved"))
    assert cli("site", "approvals", "show", digest, "--home", site_home, "--offline").exit_code == 0

    def lying(*args: Any, **kwargs: Any) -> None:
        raise ServiceUnavailableError(f"refused: {HOSTILE}")

    monkeypatch.setattr(agent, "report_approval", lying)
    result = cli("site", "approve", digest, "--reason", "IRB-7", "--home", site_home)
    assert result.exit_code == 0, result.output
    assert f"approved spec {digest}" in result.stdout
    assert "was not told yet" in result.stderr
    assert_inert(result.output)


# --- the operator reading what the orchestrator answers --------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat()


@pytest.fixture
def lying_orchestrator(monkeypatch, tmp_path):
    """``(credential, answers)``: the operator commands talk to an orchestrator that answers each path of
    ``answers`` with its value (JSON, or text for a str)."""
    from fedhealth.client import OperatorClient

    answers: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/token":
            expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            return httpx.Response(200, json={"access_token": "t", "expires_at": expires, "role": "admin"})
        if request.url.path not in answers:
            return httpx.Response(404, json={"error": "not_found", "detail": request.url.path})
        answer = answers[request.url.path]
        if isinstance(answer, str):
            return httpx.Response(200, text=answer)
        return httpx.Response(200, json=answer)

    def from_credential(cls: Any, path: Path, *, url: str | None = None, insecure: bool = False) -> Any:
        return OperatorClient(
            "http://orchestrator.invalid",
            user="admin",
            api_key="k",
            ca_pem=None,
            insecure=True,
            transport=httpx.MockTransport(handler),
        )

    monkeypatch.setattr(OperatorClient, "from_credential", classmethod(from_credential))
    monkeypatch.setenv("COLUMNS", "4000")  # rich wraps to the terminal: one escape per line, unsplit
    credential = tmp_path / "admin.credential"
    credential.write_text("{}")
    credential.chmod(0o600)
    return credential, answers


def _study(status: str, **fields: Any) -> dict[str, Any]:
    body = {
        "study_id": "st_" + HOSTILE,
        "spec": breast_spec(["hospital-a"], rounds=2).model_dump(mode="json"),
        "status": status,
        "reason": "cancelled by bob: " + HOSTILE,
        "created_at": _now(),
        "ended_at": None,
        "completed_rounds": 1,
        "current_round": None,
        "model_digest": None,
        "spec_hash": "ab" * 32,
    }
    body.update(fields)
    return body


def _round(site: str) -> dict[str, Any]:
    task = {"task_id": "t1", "site": site, "kind": "train", "status": "failed", "reason": HOSTILE}
    return {
        "number": 1,
        "kind": "train",
        "status": "failed",
        "started_at": _now(),
        "ended_at": None,
        "reason": HOSTILE,
        "model_digest": None,
        "metrics": None,
        "tasks": [task],
    }


def test_study_status_shows_the_orchestrators_words_escaped_and_reads_no_markup_in_them(lying_orchestrator):
    credential, answers = lying_orchestrator
    answers["/api/v1/studies/st_1"] = _study("failed", rounds=[_round(MARKUP)])
    result = cli("study", "status", "st_1", "--credential", credential)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert_visible(result.stdout)
    assert MARKUP in result.stdout  # a site's name is shown as written, not read as rich markup


def test_the_sites_an_awaiting_study_names_are_shown_escaped(lying_orchestrator):
    credential, answers = lying_orchestrator
    answers["/api/v1/studies/st_1"] = _study("awaiting_approval", approvals={HOSTILE + MARKUP: "pending"})
    result = cli("study", "status", "st_1", "--credential", credential)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert_visible(result.stdout)
    assert MARKUP in result.stdout


def test_study_list_and_cancel_show_the_orchestrators_ids_escaped(lying_orchestrator):
    credential, answers = lying_orchestrator
    answers["/api/v1/studies"] = [_study("running"), _study("completed", study_id="st_2")]
    listed = cli("study", "list", "--credential", credential)
    assert listed.exit_code == 0, listed.output
    assert_inert(listed.output)
    lines = listed.stdout.splitlines()
    assert len(lines) == 2  # one line per study: a newline in an id cannot forge another
    assert_visible(lines[0])
    assert lines[1].startswith("st_2\tbreast\tcompleted\t")
    answers["/api/v1/studies/st_1/cancel"] = _study("cancelled")
    cancelled = cli("study", "cancel", "st_1", "--credential", credential)
    assert cancelled.exit_code == 0, cancelled.output
    assert_inert(cancelled.output)
    assert_visible(cancelled.stdout)


def test_site_list_readiness_and_user_list_show_names_and_versions_escaped(lying_orchestrator):
    credential, answers = lying_orchestrator
    site = {
        "name": "hospital-a\n" + HOSTILE,
        "status": "active" + HOSTILE,
        "created_at": _now(),
        "last_seen_at": None,
        "software_version": "1.0" + HOSTILE,
    }
    answers["/api/v1/sites"] = [site]
    answers["/api/v1/sites/readiness"] = [{"site": "hospital-b\n" + HOSTILE, "readiness": None}]
    answers["/api/v1/users"] = [
        {"name": "bob\n" + HOSTILE, "role": "researcher", "created_at": _now(), "revoked_at": None}
    ]
    for command in (["site", "list"], ["site", "readiness"], ["user", "list"]):
        result = cli(*command, "--credential", credential)
        assert result.exit_code == 0, (command, result.output)
        assert_inert(result.output)
        [line] = result.stdout.splitlines()  # a newline in a name forges no second line
        assert_visible(line)


def _provenance(**fields: Any) -> Any:
    from fedhealth.governance import ModelProvenance

    values: dict[str, Any] = {
        "model_digest": "1" * 64,
        "parent_digest": None,
        "study_id": "st-1",
        "round": 1,
        "n_sites": 1,
        "dataset_fingerprints": {"hospital-a": "2" * 64},
        "consent_snapshots": {"hospital-a": "3" * 64},
        "spec_hash": "4" * 64,
        "software_version": "1.0",
        "created_at": datetime.now(UTC),
    }
    values.update(fields)
    return ModelProvenance(**values)


def test_provenance_and_a_remote_model_card_are_shown_escaped(lying_orchestrator):
    """A lying orchestrator's lineage (study id, software version) and the Markdown card it rendered reach
    the terminal with every control made visible; the card keeps its lines."""
    credential, answers = lying_orchestrator
    lineage = _provenance(study_id="st-1" + HOSTILE, software_version="1.0" + HOSTILE).to_json()
    answers[f"/api/v1/governance/models/{'1' * 16}/provenance"] = {"lineage": [lineage], "flags": []}
    shown = cli("provenance", "show", "1" * 16, "--credential", credential)
    assert shown.exit_code == 0, shown.output
    assert_inert(shown.output)
    [line] = shown.stdout.splitlines()
    assert_visible(line)
    answers[f"/api/v1/governance/models/{'1' * 16}/card"] = f"# Model card: {HOSTILE}\n\n| a | {HOSTILE} |\n"
    card = cli("model", "card", "1" * 16, "--credential", credential)
    assert card.exit_code == 0, card.output
    assert_inert(card.output)
    lines = card.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("# Model card: ")
    assert lines[2].startswith("| a | ")
    assert_visible(lines[0])


# --- what a malicious site wrote ---------------------------------------------------------------------------


def test_a_withdrawal_notice_id_cannot_inject_markdown_into_the_model_card(tmp_path):
    """A site's withdrawal notice id is free text (printable, at most 200 characters, at the orchestrator):
    in the model card it must not become an image that calls a tracker when the card is opened, a link, raw
    HTML, a character reference that turns into a bidi override, or a line of its own."""
    from markdown_it import MarkdownIt

    from fedhealth.governance import ProvenanceStore, create_governance_tables

    path = tmp_path / "orchestrator.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    store = ProvenanceStore(engine)
    store.record(_provenance())
    notice = (
        "n1 ![t](https://evil.example/t.png) <img src=https://evil.example/i.png> [click](https://evil.example/)"
        " &#x202e; `code` | \u202egnp.exe\u2028# Heading"
    )
    store.flag_withdrawal(["3" * 64], site="hospital-a", notice_id=notice)
    engine.dispose()
    result = cli("model", "card", "1" * 16, "--db", path)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    [item] = [line for line in result.stdout.splitlines() if line.startswith("- site hospital-a: trained on")]
    html = MarkdownIt("commonmark").enable("table").render(item)
    assert "<img" not in html
    assert "<a " not in html
    assert "<code>code</code>" not in html  # the snapshot hash is the only code span
    assert "\u202e" not in html  # neither raw nor from &#x202e;
    assert html.count("<li>") == 1
    assert "<h1>" not in html
    # and the id is all there to read
    for words in ("https://evil.example/t.png", "img src=https://evil.example/i.png", "#x202e;", "# Heading"):
        assert words in html


def test_a_revelation_file_from_a_site_is_shown_escaped_to_the_auditor(tmp_path):
    from fedhealth.governance._commitments import COMMITMENT_FORMAT

    revelation = tmp_path / "opened.json"
    revelation.write_text(
        json.dumps(
            {"format": COMMITMENT_FORMAT, "study_id": "st-1" + HOSTILE, "key": "00" * 32, "openings": []}
        )
    )
    verified = cli("audit", "verify-commitments", revelation)
    assert verified.exit_code == 0, verified.output
    assert_inert(verified.output)
    assert_visible(verified.stdout)
    missing = cli("audit", "verify-commitments", revelation, "--commitment", "c" * 64)
    assert missing.exit_code == 1
    assert_inert(missing.output)
    [line] = missing.stderr.splitlines()  # one error line, the site's words escaped in it
    assert line.startswith("error: commitment ")
    assert_visible(line)


def test_a_statistics_reports_names_are_shown_escaped_and_read_as_no_markup(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")
    cell = {"value": 12, "suppressed": False}
    feature = "age" + HOSTILE + MARKUP
    report = {
        "kind": "federated-statistics",
        "min_cell_count": 5,
        "sites": ["hospital-a"],
        "strata": [
            {
                "stratum": {"site": MARKUP, "label": None},
                "rows": cell,
                "features": {
                    feature: {
                        "count": cell,
                        "missing": {"value": 0, "suppressed": False},
                        "missing_fraction": {"value": 0.0, "suppressed": False},
                        "mean": {"value": 50.5, "suppressed": False},
                        "variance": {"value": 2.0, "suppressed": False},
                        "histogram": [cell, cell],
                    }
                },
            }
        ],
        "bins": {feature: [40.0]},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(report))
    result = cli("stats", "show", path)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert_visible(result.stdout)
    assert f"site={MARKUP}" in result.stdout
