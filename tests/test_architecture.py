"""The package map of DESIGN.md holds: lower layers never import higher ones; the security core is light."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_security_core_imports_without_heavy_frameworks():
    code = (
        "import sys\n"
        "import fedhealth.core, fedhealth.crypto, fedhealth.secagg, fedhealth.privacy, fedhealth.governance\n"
        "heavy = sorted(m for m in ('torch', 'lightgbm', 'xgboost', 'opacus') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- plug-ins, not name checks (issue 11) ------------------------------------------------------------------

# Modules that may look at a recipe's name: the registry (it looks recipes up by name) and the built-in
# recipes' own modules. The governance policy's allowed_recipes compares names by design (a steward's
# allow-list); it compares a request's string with the list's, which this scan does not flag.
RECIPE_NAME_MODULES = frozenset(
    {
        "learning/_registry.py",
        "learning/_recipe.py",
        "learning/_logreg_recipe.py",
        "learning/_synthetic.py",
    }
)


def builtin_recipe_names() -> frozenset[str]:
    """The names fedhealth's own distribution registers under ``fedhealth.recipes``."""
    eps = importlib.metadata.distribution("fedhealth").entry_points
    return frozenset(ep.name.split("@", 1)[0] for ep in eps if ep.group == "fedhealth.recipes")


def _is_recipe_name(node: ast.expr) -> bool:
    """``<...>recipe.name`` or ``<...>recipe.name.value`` (``task.recipe.name``, ``recipe.name``) or
    ``<...>["recipe"]["name"]``."""
    if isinstance(node, ast.Attribute) and node.attr == "value":
        node = node.value
    if isinstance(node, ast.Attribute) and node.attr == "name":
        base = node.value
        ident = (
            base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
        )
        return ident.lower().endswith("recipe")
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value == "name"
    ):
        inner = node.value
        return (
            isinstance(inner, ast.Subscript)
            and isinstance(inner.slice, ast.Constant)
            and inner.slice.value == "recipe"
        )
    return False


def _names_a_builtin(node: ast.expr, names: frozenset[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_builtin(e, names) for e in node.elts)
    return False


def _looks_up_a_recipe_name(node: ast.AST) -> bool:
    """``table[<...>.recipe.name]`` or ``table.get(<...>.recipe.name)``."""
    if isinstance(node, ast.Subscript):
        return _is_recipe_name(node.slice)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and any(_is_recipe_name(a) for a in node.args)
    )


def recipe_name_checks(source: str, names: frozenset[str]) -> list[str]:
    """Every place in ``source`` that branches on a recipe's name: the RecipeName enum, a comparison (or
    match, dict lookup) involving ``.recipe.name``, a comparison with a built-in recipe's name literal."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if (isinstance(node, ast.Name) and node.id == "RecipeName") or (
            isinstance(node, ast.Attribute) and node.attr == "RecipeName"
        ):
            found.append(f"{line}: uses RecipeName")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_recipe_name(op) for op in operands):
                found.append(f"{line}: compares a recipe's name")
            elif any(_names_a_builtin(op, names) for op in operands):
                found.append(f"{line}: compares with a built-in recipe's name")
        elif isinstance(node, ast.Match) and _is_recipe_name(node.subject):
            found.append(f"{line}: matches on a recipe's name")
        elif isinstance(node, ast.MatchValue) and _names_a_builtin(node.value, names):
            found.append(f"{line}: matches a built-in recipe's name")
        elif _looks_up_a_recipe_name(node):
            found.append(f"{line}: looks a recipe's name up in a table")
    return found


def test_the_recipe_name_scan_finds_each_way_of_branching_on_a_name():
    names = frozenset({"logreg", "synthetic"})
    branching = [
        "if task.recipe.name is RecipeName.LOGREG: pass",
        "if spec.recipe.name.value != 'synthetic': pass",
        "ok = recipe.name == other",
        "ok = kind in ('logreg', 'xgboost')",
        "ok = 'synthetic' == x",
        "match spec.recipe.name:\n    case _: pass",
        "match x:\n    case 'logreg': pass",
        "f = TRAINERS[task.recipe.name]",
        "f = TRAINERS.get(task.recipe.name)",
        "ok = report['spec']['recipe']['name'] == x",
    ]
    for source in branching:
        assert recipe_name_checks(source, names), source
    neutral = [
        "log.info('recipe %s', task.recipe.name)",
        "request = PolicyRequest(recipe=task.recipe.name)",
        "ok = task.recipe == spec.recipe",
        "ok = dataset.name == 'synthetic-data'",
        "ok = value in allowed_recipes",
        "name = 'logreg'",
    ]
    for source in neutral:
        assert not recipe_name_checks(source, names), source


def test_no_module_outside_the_registry_and_the_recipes_branches_on_a_recipe_name():
    names = builtin_recipe_names()
    assert {"logreg", "synthetic"} <= names
    src = ROOT / "src" / "fedhealth"
    offenders = []
    scanned = 0
    for path in sorted(src.rglob("*.py")):
        module = path.relative_to(src).as_posix()
        if module in RECIPE_NAME_MODULES:
            continue
        scanned += 1
        offenders += [f"{module}:{f}" for f in recipe_name_checks(path.read_text(), names)]
    assert scanned > 100
    assert not offenders, "ask the recipe (fedhealth.runtime.study_recipe), not its name:\n" + "\n".join(
        offenders
    )


def test_test_modules_have_unique_basenames():
    # pytest imports test modules by basename (rootdir, no packages): two of one name break collection
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen[path.name] = path
    assert not clashes, clashes
