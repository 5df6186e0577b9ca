"""The recipe library's measured table (recipes/README.md) is re-measured: every recipe baked and evaluated again.

This is what CI used to run as a separate step; as a test of the slow tier it runs under the README's one command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_recipe_figures_reproduce_and_the_table_is_rendered_from_them(smollm2_gguf):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "measure.py"), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "reproduced" in result.stdout and "README.md current" in result.stdout
