"""The package map of DESIGN.md holds: lower layers never import higher ones; the security core is light."""

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
