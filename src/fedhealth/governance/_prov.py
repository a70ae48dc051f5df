"""W3C PROV-JSON for a model's lineage, and its Markdown model card.

PROV-JSON (W3C member submission, 2013): a document of ``prefix`` declarations, records (``entity``,
``activity``, ``agent``) keyed by qualified name, and relations (``wasGeneratedBy``, ``used``,
``wasDerivedFrom``, ``wasAssociatedWith``, ``wasAttributedTo``) keyed by blank-node ids whose attributes name
the records they relate. Every name fedhealth writes is in the ``fh:`` namespace (``urn:fedhealth:``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedhealth.core import InputError
from fedhealth.governance._consent import SUPPRESSION_THRESHOLD, suppress
from fedhealth.governance._provenance import FlagReason, ModelProvenance, WithdrawalFlag
from fedhealth.governance._timefmt import format_instant
from fedhealth.privacy import MembershipMeasurement, MembershipReport

PROV_NAMESPACE = "urn:fedhealth:"
PROV_RELATIONS = ("wasGeneratedBy", "used", "wasDerivedFrom", "wasAssociatedWith", "wasAttributedTo")


def _qname(value: str) -> dict[str, str]:
    return {"$": value, "type": "prov:QUALIFIED_NAME"}


def _model_id(digest: str) -> str:
    return f"fh:model/{digest}"


def to_prov_json(
    lineage: Sequence[ModelProvenance], *, flags: Iterable[WithdrawalFlag] = ()
) -> dict[str, Any]:
    """The lineage (newest first, as ``ProvenanceStore.lineage`` returns it) as a PROV-JSON document."""
    flagged: dict[str, list[str]] = {}
    for flag in flags:
        flagged.setdefault(flag.model_digest, []).append(flag.notice_id)
    doc: dict[str, Any] = {
        "prefix": {"fh": PROV_NAMESPACE, "xsd": "http://www.w3.org/2001/XMLSchema#"},
        "entity": {},
        "activity": {},
        "agent": {},
        **{relation: {} for relation in PROV_RELATIONS},
    }
    counter = iter(range(1, 1_000_000_000))

    def relate(kind: str, **attributes: Any) -> None:
        doc[kind][f"_:{kind}{next(counter)}"] = attributes

    in_lineage = {p.model_digest for p in lineage}
    for p in lineage:
        model = _model_id(p.model_digest)
        doc["entity"][model] = {
            "prov:type": _qname("fh:ModelVersion"),
            "prov:label": f"{p.study_id} round {p.round}",
            "fh:digest": p.model_digest,
            "fh:study": p.study_id,
            "fh:round": p.round,
            "fh:nSites": p.n_sites,
            "fh:specHash": p.spec_hash,
            "fh:softwareVersion": p.software_version,
            "fh:dpParams": json.dumps(dict(p.dp_params), sort_keys=True),
            "fh:consentWithdrawalFlagged": p.model_digest in flagged,
        }
        activity = f"fh:training/{p.model_digest}"
        doc["activity"][activity] = {
            "prov:type": _qname("fh:TrainingRound" if p.n_sites else "fh:Initialization"),
            "prov:label": f"{p.study_id} round {p.round}",
            "prov:endTime": format_instant(p.created_at),
        }
        relate(
            "wasGeneratedBy",
            **{"prov:entity": model, "prov:activity": activity, "prov:time": format_instant(p.created_at)},
        )
        spec = f"fh:spec/{p.spec_hash}"
        doc["entity"].setdefault(spec, {"prov:type": _qname("fh:StudySpec"), "fh:specHash": p.spec_hash})
        relate("used", **{"prov:activity": activity, "prov:entity": spec})
        software = f"fh:software/fedhealth-{p.software_version}"
        doc["agent"].setdefault(
            software,
            {"prov:type": _qname("prov:SoftwareAgent"), "prov:label": f"fedhealth {p.software_version}"},
        )
        relate("wasAssociatedWith", **{"prov:activity": activity, "prov:agent": software})
        if p.parent_digest is not None:
            parent = _model_id(p.parent_digest)
            if p.parent_digest not in in_lineage:  # a cut lineage still references a declared record
                doc["entity"].setdefault(
                    parent, {"prov:type": _qname("fh:ModelVersion"), "fh:digest": p.parent_digest}
                )
            relate("used", **{"prov:activity": activity, "prov:entity": parent})
            relate(
                "wasDerivedFrom",
                **{"prov:generatedEntity": model, "prov:usedEntity": parent, "prov:activity": activity},
            )
        for site in p.sites:
            agent = f"fh:site/{site}"
            doc["agent"].setdefault(agent, {"prov:type": _qname("prov:Organization"), "prov:label": site})
            association: dict[str, Any] = {"prov:activity": activity, "prov:agent": agent}
            if site in p.epsilon_spent:
                association["fh:epsilonSpent"] = float(p.epsilon_spent[site])
            relate("wasAssociatedWith", **association)
            dataset = f"fh:dataset/{site}/{p.dataset_fingerprints[site]}"
            if dataset not in doc["entity"]:
                doc["entity"][dataset] = {
                    "prov:type": _qname("fh:DatasetFingerprint"),
                    "fh:fingerprint": p.dataset_fingerprints[site],
                }
                relate("wasAttributedTo", **{"prov:entity": dataset, "prov:agent": agent})
            relate("used", **{"prov:activity": activity, "prov:entity": dataset})
            consent = f"fh:consent/{site}/{p.consent_snapshots[site]}"
            if consent not in doc["entity"]:
                doc["entity"][consent] = {
                    "prov:type": _qname("fh:ConsentSnapshot"),
                    "fh:snapshotHash": p.consent_snapshots[site],
                }
                relate("wasAttributedTo", **{"prov:entity": consent, "prov:agent": agent})
            relate("used", **{"prov:activity": activity, "prov:entity": consent})
    return doc


# --- model card -------------------------------------------------------------------------------------------


# What Markdown (CommonMark, GFM tables, inline HTML) acts on inside a line: a table cell's end, a code span,
# a link or image, an autolink or HTML tag, a character reference (``&#x202e;``), and the escape itself.
_MARKDOWN_ACTIVE = frozenset("\\`|[]<>&")


def _cell(value: object) -> str:
    """Text a site, the orchestrator or a file wrote, as inert Markdown on one line (a table cell, a list
    item): every control, line break, bidi control and invisible character is written as its escape
    (``\\u202e``, ``\\n``), and every character Markdown would act on is backslash-escaped, so a name or
    notice id can neither end the cell or line, nor inject a link, an image or HTML, nor reorder the text."""
    out = []
    for ch in str(value):
        if not ch.isprintable():
            ch = ch.encode("unicode_escape").decode("ascii")
        out.append("".join(f"\\{c}" if c in _MARKDOWN_ACTIVE else c for c in ch))
    return "".join(out)


def _number(name: str, value: float, threshold: int) -> str:
    if name.startswith(("num_", "n_")) and float(value).is_integer():
        return str(suppress(int(value), threshold))
    return f"{value:.4g}"


def model_card_markdown(
    lineage: Sequence[ModelProvenance],
    *,
    intended_use: str,
    site_metrics: Mapping[str, Mapping[str, float]] | None = None,
    flags: Sequence[WithdrawalFlag] = (),
    suppression_threshold: int = SUPPRESSION_THRESHOLD,
    membership: MembershipReport | None = None,
) -> str:
    """A Markdown model card for ``lineage[0]``: model details, intended use, data, per-site metrics, privacy
    guarantee (with ``membership``: the measured membership-inference figures beside epsilon), consent
    statement and lineage. Counts in metrics (``num_*``, ``n_*``) below the threshold are suppressed."""
    if not lineage:
        raise InputError("a model card needs the model's provenance")
    model = lineage[0]
    metrics = dict(site_metrics or {})
    lines = [
        f"# Model card: {_cell(model.study_id)}, round {model.round}",
        "",
        "## Model details",
        "",
        f"- Model digest (sha256): `{model.model_digest}`",
        f"- Parent model: `{model.parent_digest}`"
        if model.parent_digest
        else "- Parent model: none (initial model)",
        f"- Study: `{model.study_id}`, spec hash `{model.spec_hash}`",
        f"- Produced {format_instant(model.created_at)} by fedhealth {_cell(model.software_version)}",
        "",
        "## Intended use",
        "",
        intended_use.strip(),
        "",
        "## Data",
        "",
        f"Trained by federated learning across {model.n_sites} site(s); no patient record left its site.",
        "",
    ]
    if model.n_sites:
        lines += ["| Site | Dataset fingerprint | Consent model | Consent snapshot |", "|---|---|---|---|"]
        lines += [
            f"| {_cell(s)} | `{model.dataset_fingerprints[s]}` "
            f"| {_cell(model.consent_models.get(s, 'not stated'))} "
            f"| `{model.consent_snapshots[s]}` |"
            for s in model.sites
        ]
        lines.append("")
    lines += ["## Per-site metrics", ""]
    if metrics:
        names = sorted({name for values in metrics.values() for name in values})
        lines += ["| Site | " + " | ".join(_cell(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for site in sorted(metrics):
            cells = [
                _number(n, metrics[site][n], suppression_threshold) if n in metrics[site] else "n/a"
                for n in names
            ]
            lines.append(f"| {_cell(site)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Counts below {suppression_threshold} are shown as <{suppression_threshold}.")
    else:
        lines.append("No per-site evaluation has been recorded for this model version.")
    lines += ["", "## Privacy guarantee", ""]
    lines += _privacy_lines(model)
    if membership is not None:
        lines += ["", *_membership_lines(model, membership)]
    lines += ["", "## Consent statement", ""]
    lines += _consent_lines(model, flags)
    lines += ["", "## Lineage", ""]
    lines += [
        f"{i + 1}. `{p.model_digest[:16]}` round {p.round}, {p.n_sites} site(s), spec `{p.spec_hash[:12]}`"
        for i, p in enumerate(lineage)
    ]
    return "\n".join(lines) + "\n"


def _privacy_lines(model: ModelProvenance) -> list[str]:
    """Each epsilon with the delta it holds at and the level it protects: ``epsilon_spent`` is record level
    (each site's patients) at ``epsilon_delta``; a site-level figure (a whole site's participation) is
    printed as such, never in place of the record-level one."""
    params = dict(model.dp_params)
    site_level = params.get("site_level_epsilon")
    if not model.epsilon_spent and site_level is None:
        return ["No differential-privacy guarantee was recorded for this model version."]
    # ModelProvenance's contract: epsilon_spent holds at epsilon_delta (or, if absent, delta); the
    # orchestrator records the sites' figures at the spec's delta for exactly this reason.
    delta = params.get("epsilon_delta", params.get("delta"))
    lines: list[str] = []
    if model.epsilon_spent:
        worst = max(model.epsilon_spent.values())
        at = f" and δ = {delta:g}." if delta is not None else " (δ not recorded)."
        column = "record-level ε spent (cumulative)" + (f", at δ = {delta:g}" if delta is not None else "")
        lines += [
            "Record-level differential privacy (each patient at each site): for this study up to this "
            f"version, each site's patients are protected by (ε, δ)-DP with ε ≤ {worst:.4g}" + at,
            "",
            f"| Site | {column} |",
            "|---|---|",
        ]
        lines += [f"| {_cell(s)} | {model.epsilon_spent[s]:.4g} |" for s in sorted(model.epsilon_spent)]
    if site_level is not None:
        mode = params.get("mode", "site")
        lines += [
            "",
            f"Site-level differential privacy (a whole site's participation, mode {_cell(mode)}): "
            f"(ε, δ)-DP with ε = {float(site_level):.4g} and δ = {float(params.get('delta', 0.0)):g} "
            "over the rounds up to this version.",
        ]
    if params:
        lines += [
            "",
            "Mechanism parameters: " + ", ".join(f"{k} = {_cell(v)}" for k, v in sorted(params.items())),
        ]
    return lines


def _strongest(rows: Sequence[MembershipMeasurement]) -> MembershipMeasurement:
    return max(rows, key=lambda m: (m.figures.auc, m.figures.tpr_at_fpr))


def _membership_lines(model: ModelProvenance, report: MembershipReport) -> list[str]:
    """The privacy benchmark's figures: per dataset and setting, the strongest attack's AUC and TPR at the
    benchmark's FPR, beside the epsilon the ledgers accounted; and which measured setting this model's own
    epsilon falls under. They were measured on models the same recipes trained on benchmark data, not on
    this model: the card says so."""
    groups: dict[tuple[str, str, float | None], list[MembershipMeasurement]] = {}
    for m in report.measurements:
        groups.setdefault((m.dataset, m.setting, m.epsilon), []).append(m)
    fpr = report.measurements[0].figures.fpr
    lines = [
        "### Measured membership inference",
        "",
        f"`fedhealth benchmark membership` ({_cell(report.measured_at)}): how well membership-inference "
        "attacks (loss threshold; LiRA online and offline, Carlini et al. 2022) tell training records from "
        "held-out records of models that fedhealth's recipes trained on the benchmark datasets at each "
        "privacy setting. These are measurements on those models, not on this one. Chance is an AUC of 0.5 "
        f"and a TPR of {fpr:.0%} at {fpr:.0%} FPR; the strongest attack of each setting is shown.",
        "",
        f"| Dataset | Setting | Models x rounds | ε accounted (δ) | Strongest attack | Attack AUC | "
        f"TPR at {fpr:.0%} FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dataset, setting, eps), rows in groups.items():
        best = _strongest(rows)
        delta = f" ({best.delta:g})" if best.delta is not None else ""
        eps_text = f"{eps:.3g}{delta}" if eps is not None else "∞ (no DP)"
        size = f"{best.models} x {best.rounds}" if best.models and best.rounds else "n/a"
        lines.append(
            f"| {_cell(dataset)} | {_cell(setting)} | {size} | {eps_text} | {best.attack.value} | "
            f"{best.figures.auc:.3f} | {best.figures.tpr_at_fpr:.3f} |"
        )
    lines.append("")
    if model.epsilon_spent:
        own = max(model.epsilon_spent.values())
        above = [m for m in report.measurements if m.epsilon is not None and m.epsilon >= own * (1 - 1e-9)]
        if above:
            nearest = min(m.epsilon for m in above if m.epsilon is not None)
            at = _strongest([m for m in above if m.epsilon == nearest])
            lines.append(
                f"This model's record-level ε ≤ {own:.4g}: at the nearest measured ε not below it "
                f"({nearest:.3g}, {_cell(at.dataset)}) the strongest attack reached AUC "
                f"{at.figures.auc:.3f} and TPR {at.figures.tpr_at_fpr:.3f} at {fpr:.0%} FPR."
            )
        else:
            lines.append(
                f"This model's record-level ε ≤ {own:.4g} is above every measured ε: the figures above do "
                "not cover it."
            )
    else:
        lines.append("This model carries no differential-privacy guarantee: compare it with the no-DP rows.")
    return lines


_CONSENT_RULES = {
    "opt-in": "training used only the patients whose recorded consent permitted the study's purpose on the "
    "training date",
    "opt-out": "training used every patient except those whose recorded consent denied the study's purpose, "
    "or who had withdrawn it, on the training date (no record: used)",
}


def _consent_lines(model: ModelProvenance, flags: Sequence[WithdrawalFlag]) -> list[str]:
    """What consent admitted a patient, by the consent model each site stated (opt-in and opt-out differ for
    a patient with no record), then the withdrawal flags."""
    by_model: dict[str, list[str]] = {}
    for site in model.sites:
        by_model.setdefault(model.consent_models.get(site, ""), []).append(site)
    if not model.consent_models:  # none stated (the initial model, or a record made before sites said it)
        lines = [
            "At each site, training used only the patients its consent policy admitted for the study's "
            "purpose on the training date (the consent model of each site was not recorded for this "
            "version); the consent snapshot each site used is named by its hash in the Data section."
        ]
    elif set(by_model) == {"opt-in"}:
        lines = [
            f"At each site (opt-in everywhere), {_CONSENT_RULES['opt-in']}; the consent snapshot each site "
            "used is named by its hash in the Data section."
        ]
    else:
        lines = [
            "Each site applied its own consent model; the model and the consent snapshot each site used are "
            "in the Data section.",
            "",
        ]
        for name in ("opt-in", "opt-out"):
            if name in by_model:
                sites = ", ".join(_cell(s) for s in by_model[name])
                lines.append(f"- {name} ({sites}): {_CONSENT_RULES[name]}.")
        if "" in by_model:
            sites = ", ".join(_cell(s) for s in by_model[""])
            lines.append(f"- not stated ({sites}): the site's consent policy, not recorded for this version.")
    lines.append("")
    if not flags:
        lines.append("No consent withdrawal affecting this model version has been reported.")
        return lines
    direct = [f for f in flags if f.reason is FlagReason.TRAINED_ON_WITHDRAWN]
    derived = [f for f in flags if f.reason is FlagReason.DERIVED_FROM_FLAGGED]
    lines.append(
        f"**Flagged:** consent was withdrawn after training by patient(s) whose data this version depends on "
        f"({len(flags)} notice(s))."
    )
    lines += [
        f"- site {_cell(f.site)}: trained on snapshot `{f.snapshot_hash}` (notice {_cell(f.notice_id)})"
        for f in direct
    ]
    lines += [
        f"- site {_cell(f.site)}: derived from flagged version `{(f.via_digest or '')[:16]}` "
        f"(notice {_cell(f.notice_id)})"
        for f in derived
    ]
    return lines
