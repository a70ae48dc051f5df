"""Study spec files: the commented TOML template ``fedhealth study init`` writes, and the loader every study
command (and the Python API) reads them with.

The spec file is what the owner submits and what each site's steward approves by hash: the hash is taken over
the spec *as the sites receive it* (validated, every default filled in:
``StudySpec.model_dump(mode="json")``), so a file that leaves a field at its default hashes the same as one
that spells it out.

The template is written by :func:`spec_template` alone: when the spec's format changes (the recipe becomes
``{name, version, params}``), this one function and its test change.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedhealth.client._words import field_errors
from fedhealth.core import InputError
from fedhealth.governance import spec_hash
from fedhealth.protocol import StudySpec


class SpecFileError(InputError):
    """A study spec file cannot be read or does not validate; the message names the file and the field."""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def spec_template(
    *,
    recipe: str,
    dataset: str,
    sites: list[str],
    name: str = "my-study",
    owner: str = "admin",
    features: int | None = None,
    rounds: int = 5,
    feature_names: list[str] | None = None,
) -> str:
    """A commented study spec in TOML, valid as written once the sites and the model's width are right.
    The ``[recipe.params]`` lines come from the recipe itself (``Recipe.template``), so a plug-in recipe
    gets a template too; an unknown recipe is :class:`~fedhealth.learning.UnknownRecipeError`."""
    from fedhealth.learning import default_registry

    registry = default_registry()
    versions = registry.versions(recipe)
    if not versions:
        from fedhealth.learning import UnknownRecipeError

        raise UnknownRecipeError(
            f"no recipe {recipe!r} is installed here (installed: {', '.join(registry.names()) or 'none'})"
        )
    version = versions[-1]
    chosen = registry.get(recipe, version)
    if feature_names is not None:
        features = len(feature_names)
        if "feature_names" not in chosen.params_model.model_fields:
            raise InputError(f"recipe {recipe!r} takes no feature names: give --features a number")
    recipe_lines = [f"{p.key} = {_toml(p.value)}  # {p.comment}" for p in chosen.template(features)]
    if feature_names is not None:
        recipe_lines.append(
            f"feature_names = {_toml(list(feature_names))}  # the dataset's feature columns, in order "
            "(each site's dataset must have exactly these; a model package selects them by name)"
        )
    site_list = sites or ["site-a", "site-b"]
    lines = [
        "# A fedhealth study spec. Every field below is part of what each site's data steward approves:",
        "# change any of them and the spec hash changes. Then:",
        "#   fedhealth study hash study.toml      the hash to send to each site's steward",
        "#   fedhealth study submit study.toml    submit it, signed with your key; it awaits the approvals",
        "",
        f"name = {_toml(name)}  # lowercase letters, digits, - _ .",
        f"owner = {_toml(owner)}  # the operator account that submits it (yours)",
        'purpose = "research"  # what patients\' consent must permit',
        'description = ""  # shown to each steward',
        f"dataset = {_toml(dataset)}  # the name each site registered with `fedhealth site dataset add`",
        f"train_sites = {_toml(site_list)}",
        "# eval_sites = []  # the sites that evaluate the final model (default: the training sites)",
        f"rounds = {rounds}  # training rounds; one evaluation round follows",
        f"min_sites = {len(site_list)}  # quorum: updates a round needs to count",
        "round_deadline_s = 300.0  # a round closes with what it has after this long",
        "seed = 0",
        "",
        "[recipe]",
        f"name = {_toml(recipe)}  # `fedhealth study init --recipe` lists the recipes installed here",
        f"version = {_toml(version)}",
        "",
        "[recipe.params]",
        *recipe_lines,
        "",
        "[strategy]",
        'name = "fedavg"  # fedavg, fedprox, fedadam, fedyogi, fedadagrad or scaffold',
        "",
        "# Differential privacy: uncomment to train with record-level DP-SGD at each site. Each site's",
        "# budget is charged the planned epsilon (its steward sees it before approving).",
        "# [privacy]",
        '# mode = "record"',
        "# target_epsilon = 3.0",
        "# delta = 1e-5",
        "# max_grad_norm = 1.0",
        "# sample_rate = 0.05",
        "# steps_per_round = 20",
        "",
        "# Secure aggregation: uncomment so the orchestrator sees only the sum of the sites' updates",
        "# (at least 2 training sites). site_keys names every site's identity-key fingerprint (`fedhealth",
        "# site list --json` shows them; each steward checks its own); the threshold defaults to the",
        "# smallest safe one for the collusion bound (default: a third of the sites).",
        "# [secure_aggregation]",
        "# site_keys = { " + ", ".join(f'{_toml(s)} = "<fingerprint>"' for s in site_list) + " }",
        "",
    ]
    return "\n".join(lines)


# the orchestrator's limit on a submitted document (docs/security.md, "Limits and retries")
MAX_SPEC_BYTES = 4 << 20


def load_spec(path: Path) -> StudySpec:
    """Read a spec file (TOML, or JSON by its ``.json`` suffix) and validate it.

    The file may come from anyone (a steward is sent one to check its hash), so: only a regular file, of
    at most :data:`MAX_SPEC_BYTES` (a FIFO would block, a huge file fill memory); JSON that names a key
    twice is refused, as TOML is, since a reader sees the first value and the parser keeps the last (the
    hash would cover what the reader did not see); nesting too deep to parse is a refusal too."""
    text = _read_spec_text(path)
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        body = json.loads(text, object_pairs_hook=_without_repeats) if kind == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SpecFileError(f"{path}: not valid {kind}: {' '.join(str(exc).split())[:300]}") from exc
    except RecursionError:
        raise SpecFileError(f"{path}: not valid {kind}: nested too deep") from None
    if not isinstance(body, dict):
        raise SpecFileError(f"{path}: a study spec is an object (a table of fields)")
    try:
        return StudySpec.model_validate(body)
    except ValidationError as exc:
        raise SpecFileError(f"{path}: {field_errors(exc.errors())}") from exc


def _read_spec_text(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before fdopen: a folder would be its IsADirectoryError
        os.close(fd)
        raise SpecFileError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecFileError(f"{path}: larger than a study spec may be ({MAX_SPEC_BYTES} bytes)")
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecFileError(f"{path}: larger than a study spec may be ({MAX_SPEC_BYTES} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"{path}: cannot be read ({exc})") from exc


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, value in pairs:
        if key in body:
            raise ValueError(f"key {key[:100]!r} is given twice")
        body[key] = value
    return body


def study_spec_hash(spec: StudySpec) -> str:
    """The hash each site's steward approves: of the spec as the sites will receive it."""
    return spec_hash(spec.model_dump(mode="json"))
