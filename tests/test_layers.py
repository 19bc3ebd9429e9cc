"""The layer order of the house (pyproject.toml's import-linter contracts) holds: no module
imports from a layer above its own, and no imports go round in a circle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the `moderation` package found in `root`, with this checkout's
    contracts, without its cache (a copy of the package must be read afresh)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_module_imports_from_above_its_layer_nor_in_a_circle() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_check_finds_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The contracts can fail: a copy of the package with the settings importing the
    command line (up from the ground floor), and two worker modules importing each other."""
    shutil.copytree(ROOT / "moderation", tmp_path / "moderation")
    config = tmp_path / "moderation" / "config.py"
    config.write_text(config.read_text() + "\nimport moderation.main.cli  # noqa\n")
    sweeper = tmp_path / "moderation" / "worker" / "recovery.py"
    sweeper.write_text(sweeper.read_text() + "\nimport moderation.worker.sweeper  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "moderation.config -> moderation.main.cli" in result.stdout
    assert "Contracts: 0 kept, 2 broken." in result.stdout
