"""docs/evaluation.md's measured blocks are the rendering of docs/evaluation.json (docs/evaluation_figures.py):
no figure there is typed by hand."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _figures_module():
    spec = importlib.util.spec_from_file_location("evaluation_figures", ROOT / "docs" / "evaluation_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_of_evaluation_md_is_rendered_from_evaluation_json():
    figures = _figures_module()
    results = json.loads((ROOT / "docs" / "evaluation.json").read_text())
    text = (ROOT / "docs" / "evaluation.md").read_text()
    assert set(re.findall(r"<!-- figures:([\w-]+) -->", text)) == set(figures.BLOCKS)
    for name, render in figures.BLOCKS.items():
        begin, end = figures.markers(name)
        assert text.split(begin, 1)[1].split(end, 1)[0] == "\n" + render(results) + "\n", name


def test_the_sweep_table_holds_every_measured_cell():
    figures = _figures_module()
    results = json.loads((ROOT / "docs" / "evaluation.json").read_text())
    table = figures.render_sweep(results)
    sweep = results["sweep"]
    assert len(sweep["rows"]) == len(sweep["layers"]) * len(sweep["coefficients"])
    for row in sweep["rows"]:
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['layer']} |"))
        assert figures._cell(row) in line
