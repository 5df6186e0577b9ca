"""recipes/paper/compare.py (the paper's genre and toxicity experiments through bake compare): docs/paper.md's blocks
are the rendering of the committed compare.json, the data keep their promised sizes and held-out split, the verdicts
follow from the numbers, and the script runs end to end (tiny model; the SmolLM2 run is the committed JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bake.evaluation.sweep import CLEAR
from bake.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import figures  # noqa: E402  (docs/figures.py: imports the measuring scripts by path)

TOXICITY = ROOT / "recipes" / "paper" / "toxicity"


@pytest.fixture(scope="module")
def paper():
    """recipes/paper/compare.py, imported the way docs/figures.py renders it."""
    return figures.script("recipes/paper/compare.py")


def _lines(name: str) -> list[str]:
    return [line for line in (TOXICITY / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_page_blocks_are_the_rendering_of_the_committed_results(paper):
    page = paper.PAGE.read_text()
    results = json.loads(paper.RESULTS.read_text())
    for name in paper.sections(results):
        assert f"<!-- figures:{name} -->" in page and f"<!-- end figures:{name} -->" in page, name
    assert paper.render(results, page) == page, "run: python recipes/paper/compare.py --render"
    for name in set(paper.RECIPES) - set(results["recipes"]):  # a recipe the run did not reach says so
        assert f"{name}: not measured" in page, name
    for name, record in results["recipes"].items():
        assert list(record["rows"]) == paper.METHODS, name
        assert all(row["kl"] <= record["max_kl"] for row in record["rows"].values()), name
        assert record["seconds"] > 0 and record["goal"] == ("lower" if name == "toxicity" else "raise")


def test_toxicity_data_have_their_sizes_and_the_held_out_prompts_stay_out_of_the_measuring_data():
    prompts, held, polite, polite_held = (
        _lines(n) for n in ("prompts.txt", "heldout.txt", "polite.txt", "polite.heldout.txt")
    )
    assert len(prompts) >= 100 and len(held) >= 20 and len(polite) >= 100 and len(polite_held) >= 10
    for texts in (prompts, held, polite, polite_held):
        assert len(set(texts)) == len(texts)
    norm = lambda texts: {t.lower().strip() for t in texts}  # noqa: E731
    assert not norm(held) & (norm(prompts) | norm(polite)) and not norm(polite_held) & norm(polite)
    recipe = load_recipe(TOXICITY / "toxicity.yaml")
    ev, (entry,) = recipe.evaluate, recipe.steering
    assert Path(ev.prompts.file).name == "heldout.txt" and Path(ev.target.file).name == "polite.heldout.txt"
    assert Path(entry.target.file).name == "polite.txt" and Path(ev.compare.negative.file).name == "prompts.txt"
    assert ev.goal == "lower" and ev.scorers[:2] == ["toxicity", "vader"]


def test_genre_recipes_carry_what_compare_needs(paper):
    for genre in paper.GENRES:
        recipe = load_recipe(paper.RECIPES[genre])
        spec = recipe.evaluate.compare
        assert spec.negative is not None and spec.positive_prompt and spec.negative_prompt == "Reality", genre
        assert recipe.evaluate.scorers[0] == "wordlist"


def _record(goal: str, base: float, **scores: float) -> dict:
    return {"headline": "s", "goal": goal, "base": {"s": base}, "rows": {m: {"s": v} for m, v in scores.items()}}


def test_verdicts_follow_from_the_numbers(paper):
    # raise from base 0.1: mean-centred gains 0.2; mean 0.05 (beaten), actadd 0.2 * CLEAR * 0.99 (tie), contrast 0.5
    rec = _record(
        "raise", 0.1, **{"mean-centred": 0.3, "mean": 0.15, "actadd": 0.1 + 0.2 * CLEAR * 0.99, "contrast": 0.6}
    )
    assert paper.standing(rec) == {"mean": "beats", "actadd": "ties with", "contrast": "loses to"}
    # lower (toxicity): the larger fall wins; nobody moving it the right way is a tie
    rec = _record("lower", 0.5, **{"mean-centred": 0.2, "mean": 0.45, "actadd": 0.6, "contrast": 0.1})
    assert paper.standing(rec) == {"mean": "beats", "actadd": "beats", "contrast": "loses to"}
    rec = _record("raise", 0.5, **{"mean-centred": 0.4, "mean": 0.5})
    assert paper.standing(rec) == {"mean": "ties with"}
    results = {"recipes": {"fantasy": _record("raise", 0.0, **{"mean-centred": 0.3, "mean": 0.1, "contrast": 0.9})}}
    lines = paper.verdicts(results, ["fantasy", "scifi"])  # scifi not measured: left out, not counted
    assert lines == [
        "- **fantasy** (s, raise; base 0): mean-centred 0.3 beats mean (0.1), loses to contrast (0.9).",
        "- Over these 2 comparisons mean-centring wins 1, ties 0 and loses 1 (a tie: within a factor 1.1 of the "
        "other's change from the base).",
    ]


def test_the_script_runs_end_to_end_on_a_tiny_model(paper, tiny_models):
    """The genre and toxicity recipes as they are, with a tiny model, a small background and few prompts."""

    def tiny(data: dict) -> dict:
        data["model"] = str(tiny_models["llama"])
        data["background"] = {"sample": {"sequences": 4, "tokens": 8}}
        for entry in data["steering"]:
            entry["layer"] = 1
        ev = data["evaluate"]
        ev.update(prompts={"file": ev["prompts"], "limit": 3}, tokens=4, max_kl=0.03)
        ev["compare"].update(positive_prompt="dragon", negative_prompt="team")  # words the tiny tokenizer knows
        return data

    results = paper.measure(["sports", "toxicity"], tiny)
    for name, record in results["recipes"].items():
        assert list(record["rows"]) == paper.METHODS and record["layer"] == 1, name
        assert record["data"]["prompts"] == 3 and record["max_kl"] == 0.03
        assert all(0 < row["kl"] <= 0.03 for row in record["rows"].values()), name
        headline = record["headline"]
        assert headline == ("toxicity" if name == "toxicity" else "wordlist")
        assert all(0 <= row[headline] <= 1 for row in record["rows"].values())
    assert "vader" in results["recipes"]["toxicity"]["rows"]["mean"]
    blocks = paper.sections(results)
    assert "| sports: word rate / perplexity / KL |" in blocks["paper-genres"]
    assert blocks["paper-toxicity-verdict"].startswith("- **toxicity** (toxicity, lower;")
    page = "".join(f"<!-- figures:{n} -->\nold\n<!-- end figures:{n} -->\n" for n in blocks)
    assert paper.render(results, page) == "".join(
        f"<!-- figures:{n} -->\n{b}\n<!-- end figures:{n} -->\n" for n, b in blocks.items()
    )
