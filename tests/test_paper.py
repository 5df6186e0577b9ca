"""docs/paper.md is exactly the rendering of recipes/paper/results.json (no model runs), the task data keep the
properties the experiment relies on (no repeated input, no reversed pair, no held-out word in any ICL prompt), and
the dev sweep's batched settings answer as each setting alone does (a tiny model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


def test_a_grid_of_settings_in_one_batch_scores_each_setting_as_it_would_alone(paper, tiny_models, monkeypatch):
    """The dev sweep's batched passes (bake.verify.steered with a list: one block of rows per setting) give every
    setting the greedy replies it gives steered alone, across passes and prompts of different lengths."""
    from bake.families.hf import family_for
    from bake.sources.load import load_model, load_tokenizer
    from bake.vectorfile import VectorSet
    from bake.verify import steered

    path = tiny_models["llama"]
    model, tokenizer = load_model(path, dtype=torch.float32), load_tokenizer(path)
    family = family_for(model.config)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    settings = [VectorSet({(1, "resid_post"): c * u}) for c in (0.05, 0.1, 0.2)] + [  # larger ones saturate
        VectorSet({(2, "resid_post"): 0.2 * u}),
        VectorSet({(1, "resid_post"): 0.1 * u, (2, "resid_post"): 0.2 * u}),  # two points; the others get zero at 2
    ]
    prompts = [paper.query(w) for w in ("dog", "happy day", "the sun is very bright", "cat")]
    monkeypatch.setattr(paper, "GRID_ROWS", 2 * len(prompts))  # passes of 2, 2 and 1 settings
    batched = paper.grid_replies(model, family, tokenizer, settings, prompts)
    alone = []
    for vs in settings:
        with steered(model, family, vs):
            alone.append(paper.replies(model, tokenizer, prompts))
    assert batched == alone
    plain = paper.replies(model, tokenizer, prompts)
    assert len({tuple(a) for a in [plain, *alone]}) > 4, (plain, alone)  # the settings really answer differently
