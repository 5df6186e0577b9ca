"""docs/paper.md is exactly the rendering of recipes/paper/results.json (no model runs), and the task data keep the
properties the experiment relies on: no repeated input, no reversed pair, no held-out word in any ICL prompt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_run", ROOT / "recipes" / "paper" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_is_the_rendering_of_the_committed_results(paper):
    page = (ROOT / "docs" / "paper.md").read_text()
    assert paper.render(json.loads(paper.RESULTS.read_text()), page) == page, (
        "run: python recipes/paper/run.py --render"
    )


def test_task_data_are_clean_and_held_out_words_stay_out_of_the_prompts(paper):
    data = paper.datasets()
    assert list(data) == paper.TASKS
    for task, d in data.items():
        assert len(d["train"]) + len(d["held"]) >= 100, task
        held = {s for s, _ in d["held"]}
        assert len(held) == paper.HELD_OUT
        for prompt in d["icl"]:
            asked = {line.removeprefix("Q: ") for line in prompt.splitlines() if line.startswith("Q: ")}
            assert len(asked) == paper.SHOTS + 1 and not asked & held, (task, prompt)
        assert all(p.endswith("\nA:") for p in d["icl"] + d["icl_held"])
        assert [p.splitlines()[-2] for p in d["icl_held"]] == [f"Q: {s}" for s, _ in d["held"][: paper.ICL_BOUND]]


def test_first_word_scoring_ignores_case_accents_and_punctuation(paper):
    assert paper.first_word(" Étoile.\n\nQ:") == "etoile"
    assert paper.first_word("  N'Djamena is") == "n'djamena"
    assert paper.first_word("\n") == ""
