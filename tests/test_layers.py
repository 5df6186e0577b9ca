"""The package layout's rules hold: the import-linter contracts of pyproject.toml, a CLI that starts without
torch, and a tree that ruff passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_import_contracts_are_kept():
    """No import of bake.api or bake.cli inside the package, no evaluation in release/formats, layers downward only,
    no cycles: lint-imports exits non-zero and names the offending import chain otherwise."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("lint-imports is not installed: pip install 'bake[test]' (import-linter)")
    done = subprocess.run(
        [lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout, done.stdout


def test_help_does_not_import_torch():
    """`bake --help` (and a subcommand's --help) import no torch: `import bake` loads its API lazily and each command
    imports its library code only when it runs, so the help appears at once."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from bake.cli import main\n"
        "for args in (['--help'], ['run', '--help'], ['inspect', '--help']):\n"
        "    result = CliRunner().invoke(main, args)\n"
        "    assert result.exit_code == 0 and 'Usage' in result.output, result.output\n"
        "print(sorted(m for m in ('torch', 'safetensors', 'bake.api') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported at --help: {done.stdout.strip()}"


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["ruff-check", "ruff-format"])
def test_ruff_is_clean(check):
    """The code style of pyproject.toml's [tool.ruff] (120 columns; E, F, I, UP, B; type hints in bake/) holds for
    every file, so a change that breaks it fails here with ruff's own report."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: pip install 'bake[test]'")
    done = subprocess.run([ruff, *check, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
