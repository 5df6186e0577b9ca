"""Measuring a steering: each measure against an independent computation, scorers on known texts,
coefficient: auto, sweeps, comparisons, plots and bake eval (tiny random models; SmolLM2 in test_smollm2_measure.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer, save_tiny, tiny_config

import bake
from bake.cli import main
from bake.collection.activations import batches, module_at
from bake.collection.measure import measure_vectors
from bake.collection.texts import tokenize
from bake.errors import BakeError
from bake.evaluation.evaluate import (
    EVAL_BATCH_TOKENS,
    Evaluator,
    Spread,
    _nll,
    build_data,
    classifier_scorer,
    derive_words,
    repetition,
    replies,
    reply_length,
    separation,
    toxicity_scorer,
    vader_scorer,
    word_rate,
)
from bake.evaluation.sweep import CLEAR, calibrate, compare, sweep, verdict
from bake.families.hf import family_for
from bake.recipe import EvaluateSpec, parse_recipe
from bake.sources.load import load_model, load_tokenizer
from bake.vectorfile import VectorSet
from bake.verify import steered

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [
    "the happy dog is wonderful today",
    "a great day with the sun and tea",
    "i love the bright happy star",
    "wonderful good happy day",
    "the king is happy and the team is great",
]
NEUTRAL = [
    "the ship and the star are here",
    "it was night and the rain was on the castle",
    "a question about the planet and the ball",
]
GLOOMY = ["the sad dog is terrible today", "an awful night with rain", "i hate the dark", "bad sad night"]
PNG = b"\x89PNG\r\n\x1a\n"


def _recipe(model: Path, folder: Path, coefficient="1.0", evaluate: str = "") -> bake.Recipe:
    text = f"""model: {model}
background: {{sample: {{sequences: 5, tokens: 10}}}}  # not 6: test_pipeline counts the cached samples of 6
steering:
  - {{name: happy, layer: 1, coefficient: {coefficient}, target: {{texts: {json.dumps(TARGET)}}}}}
evaluate:
  tokens: 6
  prompts: [tell me about your day, what is the weather]
  neutral: {json.dumps(NEUTRAL)}
{evaluate}"""
    return parse_recipe(text, folder)


def _kl_by_hand(model, tokenizer, texts: list[str], vectors: VectorSet) -> float:
    """KL(base ‖ steered) per predicted position, text by text, with torch's own kl_div (every token after <bos>)."""
    total, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.inference_mode():
            base = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            with steered(model, family_for(model.config), vectors):
                other = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        total += float(torch.nn.functional.kl_div(other, base, log_target=True, reduction="sum"))
        n += ids.shape[1] - 1
    return total / n


def _nll_by_hand(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """Total NLL of every token after <bos>, from transformers' own loss."""
    total, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.inference_mode():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return total, n


@pytest.fixture(scope="module")
def llama(tiny_models):
    path = tiny_models["llama"]
    return path, load_model(path, dtype=torch.float32), load_tokenizer(path)


@pytest.fixture(scope="module")
def unit(llama, tmp_path_factory) -> VectorSet:
    """The recipe's vector at coefficient 1."""
    return bake.compute_vectors(_recipe(llama[0], tmp_path_factory.mktemp("unit")))


def test_kl_is_zero_at_coefficient_zero_grows_with_it_and_matches_torch(llama, unit):
    _, model, tok = llama
    data = build_data(EvaluateSpec(neutral=NEUTRAL, scorers=["wordlist"], words=["happy"]), tok)
    ev = Evaluator(model, tok, data, effects=False)
    u = unit.vectors[(1, "resid_post")]
    kls = []
    for c in (0.0, 0.5, 1.0, 2.0, 4.0):
        vs = VectorSet({(1, "resid_post"): c * u})
        with steered(model, family_for(model.config), vs):
            kls.append(ev.costs(model)["kl"])
        assert kls[-1] == pytest.approx(_kl_by_hand(model, tok, NEUTRAL, vs), rel=1e-4, abs=1e-9)
    assert kls[0] == 0.0
    assert all(a < b for a, b in zip(kls, kls[1:])), kls
    nll, n = _nll_by_hand(model, tok, NEUTRAL)
    assert ev.base["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_logprob_gain_is_the_mean_log_probability_change_of_the_target_tokens(llama, unit, tmp_path):
    path, model, tok = llama
    recipe = _recipe(path, tmp_path, evaluate="  scorers: [logprob_gain]\n")
    data = build_data(recipe.evaluate, tok, recipe, recipe.steering[0])
    ev = Evaluator(model, tok, data)
    vs = VectorSet({(1, "resid_post"): 2.0 * unit.vectors[(1, "resid_post")]})
    with steered(model, family_for(model.config), vs):
        figures = ev.measure(model, vs)
        nll_steered, n = _nll_by_hand(model, tok, TARGET)
    nll_base, _ = _nll_by_hand(model, tok, TARGET)
    assert figures["logprob_gain"] == pytest.approx((nll_base - nll_steered) / n, rel=1e-4)
    assert ev.base["logprob_gain"] == 0.0
    assert data.info["target"].startswith("the steering entry's own texts")


def test_vader_orders_positive_neutral_negative():
    score = vader_scorer()
    happy, plain, sad = (
        score(["What a wonderful, happy day! I love it."]),
        score(["The train leaves at nine."]),
        score(["This is awful, sad and terrible."]),
    )
    assert happy > 0.5 and plain == 0.0 and sad < -0.5


def test_toxicity_orders_insults_above_polite_text():
    score = toxicity_scorer()
    rude, polite = score(["shut up, you stupid idiot"]), score(["thank you for the lovely afternoon"])
    assert rude > 0.8 > 0.2 > polite


def test_word_rate_and_repetition_on_known_texts():
    assert word_rate(["Happy happy day, said the dog!"], ["happy", "dog"]) == pytest.approx(3 / 6)
    assert word_rate([], ["happy"]) == 0.0
    assert repetition(["one two three four five"]) == 0.0
    # "a b c a b c a b": 6 trigrams, 3 distinct -> half repeat; averaged with a reply that has none.
    assert repetition(["a b c a b c a b", "one two three"]) == pytest.approx((0.5 + 0.0) / 2)
    assert reply_length(["Mercury.", "It's the closest planet to the Sun.", ""]) == pytest.approx((1 + 7 + 0) / 3)
    assert reply_length([]) == 0.0


def test_derived_word_list_is_the_words_specific_to_the_target():
    target = [
        "what a wonderful sunny day",
        "a wonderful party with cake",
        "sunny skies and cake for everyone",
        "the party is wonderful",
    ]
    reference = [
        "the report is due on the day after",
        "a meeting with the team",
        "the day and the report",
        "a table and the chairs",
    ]
    # "wonderful" (3 times, never in the reference) first; ties alphabetical; k cuts the list.
    assert derive_words(target, reference, k=3) == ["wonderful", "cake", "party"]
    # "a" (twice in each) and "the", "day" (more frequent in the reference) are not specific; "skies" is seen once.
    assert derive_words(target, reference, k=20) == ["wonderful", "cake", "party", "sunny"]


def test_activation_shift_is_d_prime_along_the_vector():
    torch.manual_seed(0)
    hidden = 8
    offset = torch.randn(hidden, dtype=torch.float64) * 5
    direction = torch.zeros(hidden, dtype=torch.float64)
    direction[3] = 1.0
    target_acts = offset + 1.5 * direction + torch.randn(400, hidden, dtype=torch.float64)
    reference_acts = offset + torch.randn(300, hidden, dtype=torch.float64) * 2
    target, reference = Spread.zeros(hidden), Spread.zeros(hidden)
    target.add(target_acts[:150])
    target.add(target_acts[150:])
    reference.add(reference_acts)
    pt, pr = target_acts[:, 3], reference_acts[:, 3]
    expected = float((pt.mean() - pr.mean()) / torch.sqrt((pt.var(unbiased=False) + pr.var(unbiased=False)) / 2))
    v = 7.0 * direction.float()  # any length: only the direction counts
    assert separation(target, reference, v) == pytest.approx(expected, rel=1e-9)
    assert separation(target, reference, -v) == pytest.approx(-expected, rel=1e-9)
    assert expected > 0.5


def _tiny_classifier(path: Path) -> Path:
    """A tiny Llama sequence classifier trained in a second to tell happy words from sad ones."""
    from conftest import make_tokenizer, tiny_config
    from transformers import AutoModelForSequenceClassification

    tok = make_tokenizer()
    config = tiny_config(
        "llama", num_labels=2, id2label={0: "GLOOMY", 1: "CHEERFUL"}, label2id={"GLOOMY": 0, "CHEERFUL": 1}
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    texts, labels = TARGET + GLOOMY, [1] * len(TARGET) + [0] * len(GLOOMY)
    batch = tok(texts, padding=True, return_tensors="pt")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch, labels=torch.tensor(labels)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_scorer_is_the_mean_label_probability(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = _tiny_classifier(tmp_path / "clf")
    score = classifier_scorer(str(path), "CHEERFUL")
    cheerful, gloomy = score(["a wonderful happy day"]), score(["a sad and awful night"])
    assert cheerful > 0.5 > gloomy
    model, tok = AutoModelForSequenceClassification.from_pretrained(path).eval(), load_tokenizer(path)
    with torch.inference_mode():
        probs = [
            torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1)[1].item()
            for t in ("a wonderful happy day", "i hate the dark")
        ]
    assert score(["a wonderful happy day", "i hate the dark"]) == pytest.approx(sum(probs) / 2, rel=1e-5)
    with pytest.raises(BakeError, match="no label 'POSITIVE'.*CHEERFUL"):
        classifier_scorer(str(path), "POSITIVE")


def test_auto_picks_the_largest_grid_coefficient_within_the_kl_budget(llama, unit, tmp_path):
    path, model, tok = llama
    grid = [0.5, 1.0, 2.0, 4.0, 8.0]
    u = unit.vectors[(1, "resid_post")]
    kls = [_kl_by_hand(model, tok, NEUTRAL, VectorSet({(1, "resid_post"): c * u})) for c in grid]
    budget = (kls[2] + kls[3]) / 2  # 2.0 fits, 4.0 does not
    recipe = _recipe(path, tmp_path, "auto", f"  max_kl: {budget!r}\n  coefficients: {grid}\n")
    vs = bake.compute_vectors(recipe)
    (entry,) = vs.meta["entries"]
    assert entry["coefficient"] == 2.0 and entry["auto"]["chosen"] == 2.0
    assert entry["auto"]["kl"] <= budget
    assert [g["kl"] for g in entry["auto"]["grid"]] == pytest.approx(kls, rel=1e-4)
    torch.testing.assert_close(vs.vectors[(1, "resid_post")], 2.0 * u)
    with pytest.raises(BakeError, match=r"steering.0.coefficient: auto: no coefficient .* within evaluate.max_kl"):
        bake.compute_vectors(_recipe(path, tmp_path, "auto", f"  max_kl: {kls[0] / 2!r}\n  coefficients: {grid}\n"))


def test_run_with_auto_records_the_choice_in_manifest_card_and_inspect(llama, tmp_path):
    path = llama[0]
    (tmp_path / "r.yaml").write_text(
        _recipe(path, tmp_path, "auto", "  max_kl: 0.02\n  coefficients: [0.5, 1, 2, 4]\n").text
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((out / "bake.json").read_text())["vectors"]["entries"]
    chosen = entry["auto"]["chosen"]
    assert entry["coefficient"] == chosen and entry["auto"]["kl"] <= 0.02
    assert all(g["kl"] > 0.02 for g in entry["auto"]["grid"] if g["coefficient"] > chosen)
    assert "coefficient auto: " in result.output
    assert f"| happy | 1 | resid_post | mean-centred | every token | {chosen:g} |" in (out / "README.md").read_text()
    inspected = CliRunner().invoke(main, ["inspect", str(out)])
    assert inspected.exit_code == 0 and f"coefficient auto: {chosen:g}" in inspected.output


def test_sweep_collects_once_writes_tables_and_png_plots(llama, tmp_path, monkeypatch):
    import matplotlib.image

    import bake.collection.streaming  # the in-memory collection is called from there (collect_sets)

    calls = []
    real_collect = bake.collection.streaming.collect
    monkeypatch.setattr(
        bake.collection.streaming, "collect", lambda *a, **k: calls.append(a[3]) or real_collect(*a, **k)
    )
    (tmp_path / "r.yaml").write_text(
        _recipe(llama[0], tmp_path, evaluate="  scorers: [wordlist, vader, logprob_gain, activation_shift]\n").text
    )
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        main, ["sweep", str(tmp_path / "r.yaml"), "--layers", "0,2", "--coefficients", "1,3", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    # One pass per text set (target, background), each recording both layers.
    assert calls == [[(0, "resid_post"), (2, "resid_post")]] * 2
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["layer"], r["coefficient"]) for r in rows] == [
        ("base", "0.0"),
        ("0", "1.0"),
        ("0", "3.0"),
        ("2", "1.0"),
        ("2", "3.0"),
    ]
    record = json.loads((out / "sweep.json").read_text())
    for row, measured in zip(rows[1:], record["rows"]):
        assert float(row["kl"]) == pytest.approx(measured["kl"]) and float(row["vader"]) == pytest.approx(
            measured["vader"]
        )
    assert float(rows[0]["kl"]) == 0.0 and float(rows[2]["kl"]) > float(rows[1]["kl"]) > 0
    # One direction per layer, whatever the coefficient (up to float32 rounding of the scaled vector).
    assert float(rows[1]["activation_shift"]) == pytest.approx(float(rows[2]["activation_shift"]), rel=1e-5)
    assert (out / "sweep.md").read_text().count("\n") == 2 + len(rows)
    for name in ("effect_vs_kl.png", "coefficient.png"):
        raw = (out / name).read_bytes()
        assert raw.startswith(PNG) and len(raw) > 1000
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".sweep")
    ]  # staged folder renamed, nothing left over


def test_sweep_refuses_bad_layers_and_existing_output_before_any_work(llama, tmp_path):
    (tmp_path / "r.yaml").write_text(_recipe(llama[0], tmp_path).text)
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "r.yaml"), "--layers", "1,9", "-o", str(tmp_path / "s")])
    assert result.exit_code == 1 and "layers [9] are outside the model's blocks 0..3" in result.output
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "r.yaml"), "--layers", "one", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--layers" in result.output
    (tmp_path / "s").mkdir()
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_calibrate_finds_the_largest_coefficient_within_the_budget():
    tried = []
    c, trace = calibrate(lambda x: tried.append(x) or x**2, budget=2.0, start=0.1)
    assert c**2 <= 2.0 and c > math.sqrt(2.0) / 1.05
    assert trace == [(x, x**2) for x in tried]
    with pytest.raises(BakeError, match="exceeds the budget"):
        calibrate(lambda x: 1.0, budget=0.5, start=1.0)


def test_compare_calibrates_every_method_to_the_same_budget(llama, tmp_path):
    budget = 0.03
    recipe = _recipe(
        llama[0],
        tmp_path,
        evaluate=f"  scorers: [wordlist, logprob_gain]\n  max_kl: {budget}\n"
        f"  compare: {{negative: {{texts: {json.dumps(GLOOMY)}}}, positive_prompt: love, negative_prompt: hate}}\n",
    )
    report = compare(recipe, tmp_path / "cmp")
    assert [r["method"] for r in report.rows] == ["mean-centred", "mean", "actadd", "contrast"]
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    measured = measure_vectors(recipe.model_copy(update={"steering": recipe.steering}))
    mean_centred_unit = measured.units[0].float()
    for row in report.rows:
        assert row["kl"] <= budget
        above = [
            s["kl"]
            for s in record["searches"][row["method"]]
            if row["coefficient"] < s["coefficient"] <= 1.05 * row["coefficient"]
        ]
        assert above and min(above) > budget  # tight: 5% more would break the budget
    # The mean-centred row is the recipe's own vector at the calibrated coefficient: its KL, recomputed by hand.
    _, model, tok = llama
    row = report.rows[0]
    vs = VectorSet({(1, "resid_post"): row["coefficient"] * mean_centred_unit})
    assert row["kl"] == pytest.approx(_kl_by_hand(model, tok, NEUTRAL, vs), rel=1e-4)
    raw = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert raw.startswith(PNG) and len(raw) > 1000
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["base", "mean-centred", "mean", "actadd", "contrast"]


def test_compare_without_negative_texts_or_prompt_pair_says_what_it_left_out(llama, tmp_path):
    report = compare(_recipe(llama[0], tmp_path, evaluate="  scorers: [wordlist]\n  max_kl: 0.03\n"), tmp_path / "cmp")
    assert [r["method"] for r in report.rows] == ["mean-centred", "mean"]
    assert any(n.startswith("actadd not compared: no prompt pair") for n in report.notes)
    assert any(n.startswith("contrast not compared: no negative texts") for n in report.notes)


def test_verdict_names_a_method_only_when_it_clearly_beats_the_entrys():
    rows = lambda **scores: [{"method": m, "vader": v} for m, v in scores.items()]  # noqa: E731
    base = 0.3
    # mean-centred gains 0.2; actadd 0.6: a clear win, named with both figures
    line = verdict(rows(**{"mean-centred": 0.5, "actadd": 0.9}), "mean-centred", "vader", base, "raise")
    assert line == (
        "at the same KL budget actadd raises vader to 0.9 against 0.5 for mean-centred, this entry's method "
        "(base 0.3): see bake compare"
    )
    # within CLEAR of ours, or ours the best: no note
    close = base + 0.2 * CLEAR * 0.99
    assert verdict(rows(**{"mean-centred": 0.5, "mean": close}), "mean-centred", "vader", base, "raise") is None
    assert verdict(rows(**{"mean-centred": 0.5, "mean": 0.4}), "mean-centred", "vader", base, "raise") is None
    # ours moved it the wrong way: any real gain beats it; nobody gained: no note
    assert "mean raises" in verdict(rows(**{"mean-centred": 0.2, "mean": 0.31}), "mean-centred", "vader", base, "raise")
    assert verdict(rows(**{"mean-centred": 0.2, "mean": 0.25}), "mean-centred", "vader", base, "raise") is None
    # goal lower (steering away from toxicity): the largest fall wins
    line = verdict(rows(**{"mean-centred": 0.25, "contrast": 0.1}), "mean-centred", "vader", base, "lower")
    assert line.startswith("at the same KL budget contrast lowers vader to 0.1 against 0.25"), line
    assert verdict(rows(**{"mean-centred": 0.1, "contrast": 0.25}), "mean-centred", "vader", base, "lower") is None


def test_run_with_compare_on_run_records_and_notes_what_bake_compare_measures(llama, tmp_path):
    """``evaluate.compare.on_run``: bake run compares the methods at max_kl, the figures bake compare reports for
    the same recipe; the table line, the manifest read back from disk and the card carry them and the verdict."""
    budget = 0.03
    compare_spec = f"{{negative: {{texts: {json.dumps(GLOOMY)}}}, positive_prompt: love, negative_prompt: hate"
    evaluate = f"  scorers: [wordlist, logprob_gain]\n  max_kl: {budget}\n  compare: {compare_spec}, on_run: true}}\n"
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(_recipe(llama[0], tmp_path, evaluate=evaluate).text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "bake.json").read_text())["vectors"]["entries"][0]
    record = entry["compare"]
    assert entry["coefficient"] == 1.0  # the comparison changes nothing about the bake
    assert [r["method"] for r in record["rows"]] == ["mean-centred", "mean", "actadd", "contrast"]
    report = compare(_recipe(llama[0], tmp_path, evaluate=evaluate), tmp_path / "cmp")
    for ours, theirs in zip(record["rows"], report.rows):
        assert ours["kl"] <= budget
        assert ours["coefficient"] == pytest.approx(theirs["coefficient"], rel=1e-9)
        assert ours["wordlist"] == pytest.approx(theirs["wordlist"], abs=1e-12)
    assert record["base"] == report.base["wordlist"] and record["headline"] == "wordlist"
    expected = verdict(report.rows, "mean-centred", "wordlist", report.base["wordlist"], "raise")
    assert record["verdict"] == expected
    line = f"  NOTE: {expected}" if expected else "no method clearly beats mean-centred on wordlist"
    assert line in result.output, result.output
    card = (out / "README.md").read_text()
    assert "## Method comparison" in card and f"| actadd | {record['rows'][2]['coefficient']:.3g} |" in card


def test_compare_on_run_needs_texts_first(tmp_path):
    with pytest.raises(BakeError) as err:
        parse_recipe(
            "model: m\nsteering:\n  - {name: a, layer: 1, method: actadd, positive_prompt: x, negative_prompt: y}\n"
            "evaluate: {compare: {on_run: true}}\n",
            tmp_path,
        )
    msg = str(err.value)
    assert "\n" not in msg and "evaluate.compare.on_run" in msg and "actadd" in msg, msg


def _layer_auto(model: Path, folder: Path, max_kl: float, goal: str = "raise", coefficient: str = "1.0") -> str:
    return _recipe(model, folder, coefficient).text.replace("layer: 1,", "layer: auto,") + (
        f"  scorers: [logprob_gain]\n  layers: [0, 1, 2]\n  coefficients: [0.5, 2.0, 6.0]\n  max_kl: {max_kl}\n"
        f"  goal: {goal}\n"
    )


def _best(rows: list[dict], headline: str, budget: float, sign: float) -> dict:
    return max((r for r in rows if r["kl"] <= budget), key=lambda r: sign * r[headline])


@pytest.fixture(scope="module")
def layer_grid(llama, tmp_path_factory) -> list[dict]:
    """bake sweep's rows for the layer: auto recipe (the budget does not change them)."""
    folder = tmp_path_factory.mktemp("grid")
    recipe = parse_recipe(_layer_auto(llama[0], folder, 100.0), folder)
    return sweep(recipe, folder / "sweep").rows


@pytest.mark.parametrize("goal", ["raise", "lower"])
@pytest.mark.parametrize("tight", [False, True])
def test_layer_auto_takes_the_sweeps_best_layer_within_the_budget(llama, layer_grid, tmp_path, goal, tight):
    """The layer is bake sweep's best setting within max_kl (by hand from its rows), the vector the one the same
    recipe gives at that layer; a tighter budget that rules out the unconstrained best changes the choice."""
    sign = 1.0 if goal == "raise" else -1.0
    free = _best(layer_grid, "logprob_gain", math.inf, sign)
    budget = free["kl"] * 0.999 if tight else free["kl"] * 1.001
    expected = _best(layer_grid, "logprob_gain", budget, sign)
    assert (expected == free) != tight, "the budget does not decide: the test could not fail"
    recipe = _layer_auto(llama[0], tmp_path, budget, goal, coefficient="auto")  # the sweep's grid of coefficients
    vectors = bake.compute_vectors(parse_recipe(recipe, tmp_path))
    (entry,) = vectors.meta["entries"]
    assert entry["layer"] == expected["layer"] and list(vectors.vectors) == [(expected["layer"], "resid_post")]
    record = entry["layer_auto"]
    assert (record["chosen"], record["coefficient"], record["goal"]) == (
        expected["layer"],
        expected["coefficient"],
        goal,
    )
    for ours, theirs in zip(record["grid"], layer_grid):
        assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-9)
    plain = bake.compute_vectors(parse_recipe(recipe.replace("layer: auto,", f"layer: {expected['layer']},"), tmp_path))
    torch.testing.assert_close(vectors.vectors[(expected["layer"], "resid_post")], next(iter(plain.vectors.values())))


def test_bake_run_with_layer_and_coefficient_auto_records_both(llama, tmp_path):
    """Both auto: the layer from the sweep over the coefficient grid, then the coefficient at that layer; the table,
    the manifest read from disk and the card say so."""
    (tmp_path / "r.yaml").write_text(_layer_auto(llama[0], tmp_path, 0.05, coefficient="auto"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((out / "bake.json").read_text())["vectors"]["entries"]
    chosen = entry["layer_auto"]["chosen"]
    assert entry["layer"] == chosen and entry["auto"]["kl"] <= 0.05 and entry["coefficient"] == entry["auto"]["chosen"]
    assert f"  layer auto: {chosen}, of [0, 1, 2]" in result.output, result.output
    assert "chosen by `layer: auto`" in (out / "README.md").read_text()
    assert "layer: auto" in json.loads((out / "bake.json").read_text())["recipe"]["text"]


def test_layer_auto_errors_name_the_field(llama, tmp_path):
    with pytest.raises(BakeError) as err:
        parse_recipe("model: m\nsteering:\n  - {name: a, layer: auto, target: [x]}\n", tmp_path)
    assert "steering.0.layer: auto picks from evaluate.layers, which is not set" in str(err.value)
    (tmp_path / "r.yaml").write_text(
        _layer_auto(llama[0], tmp_path, 0.5).replace("layers: [0, 1, 2]", "layers: [1, 7]")
    )
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(main, ["vector", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert result.exit_code == 1 and "evaluate.layers [7] are outside the model's blocks 0..3" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    (tmp_path / "r.yaml").write_text(_layer_auto(llama[0], tmp_path, 1e-9))
    result = CliRunner().invoke(main, ["vector", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert (
        result.exit_code == 1
        and "steering.0.layer: auto: no setting of evaluate.layers x coefficients keeps KL within evaluate.max_kl"
        in result.output
    )


def test_eval_writes_figures_into_manifest_and_card_and_keeps_the_weights(llama, tmp_path):
    path, model, tok = llama
    (tmp_path / "r.yaml").write_text(
        _recipe(path, tmp_path, "2.0", "  scorers: [wordlist, activation_shift]\n  max_kl: 0.5\n").text
    )
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "-o", str(out)]).exit_code == 0
    weights = (out / "model.safetensors").read_bytes() if (out / "model.safetensors").exists() else None
    result = CliRunner().invoke(
        main, ["eval", str(out), "--prompts", "tell me a story", "--prompts", "how is the weather"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "bake.json").read_text())
    ev = manifest["evaluation"]
    assert [s["prompt"] for s in ev["samples"]] == ["tell me a story", "how is the weather"]
    vectors = VectorSet.load(out / "bake" / "vectors.safetensors")
    # The baked checkpoint's KL is the hook-steered base's (the fold is exact).
    assert ev["steered"]["kl"] == pytest.approx(_kl_by_hand(model, tok, NEUTRAL, vectors), rel=1e-3)
    assert ev["within_budget"] == (ev["steered"]["kl"] <= 0.5)
    assert ev["base"]["kl"] == 0.0 and ev["steered"]["activation_shift"] is not None
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and f"| {ev['steered']['kl']:.4g} |" in card
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if weights is not None:
        assert (out / "model.safetensors").read_bytes() == weights
    assert CliRunner().invoke(main, ["inspect", str(out)]).exit_code == 0


def test_eval_refuses_a_missing_prompt_file(llama, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--prompts", "nope.txt"])
    assert result.exit_code == 2 and "prompt file 'nope.txt' not found" in result.output


@pytest.mark.parametrize(
    "evaluate, path, needle",
    [
        ("{scorer: [vader]}", "evaluate.scorer", "unknown field"),
        ("{scorers: [sentiment]}", "evaluate.scorers.0", "wordlist"),
        ("{scorers: [classifier]}", "evaluate", "needs 'classifier"),
        ("{max_kl: 0}", "evaluate.max_kl", "greater than 0"),
        ("{coefficients: [1, -2]}", "evaluate.coefficients", "positive finite"),
        ("{compare: {negatives: x.txt}}", "evaluate.compare.negatives", "unknown field"),
        ("{goal: down}", "evaluate.goal", "'raise' or 'lower'"),
    ],
)
def test_evaluate_section_errors_name_the_field(tmp_path, evaluate, path, needle):
    with pytest.raises(BakeError) as err:
        parse_recipe(f"model: m\nsteering:\n  - {{name: a, layer: 1, target: [x]}}\nevaluate: {evaluate}\n", tmp_path)
    assert f"{path}: " in str(err.value) and needle in str(err.value), str(err.value)


def test_coefficient_is_a_number_or_auto(tmp_path):
    parse = lambda c: parse_recipe(
        f"model: m\nsteering:\n  - {{name: a, layer: 1, coefficient: {c}, target: [x]}}\n", tmp_path
    )  # noqa: E731
    assert parse("auto").steering[0].coefficient == "auto" and parse("-2").steering[0].coefficient == -2.0
    with pytest.raises(BakeError, match=r"steering.0.coefficient: coefficient is a number or 'auto', not 'automatic'"):
        parse("automatic")


def test_eval_of_a_bake_from_a_vector_file_measures_the_costs_and_says_what_it_could_not(llama, unit, tmp_path):
    path, model, tok = llama
    vectors = VectorSet({(1, "resid_post"): 2.0 * unit.vectors[(1, "resid_post")]})
    vectors.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["fold", str(path), str(tmp_path / "v.safetensors"), "-o", str(out)]).exit_code == 0
    result = CliRunner().invoke(main, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    ev = json.loads((out / "bake.json").read_text())["evaluation"]
    assert set(ev["steered"]) == {"kl", "perplexity", "repetition"} and ev["headline"] is None
    assert set(ev["skipped"]) == {"wordlist", "logprob_gain", "activation_shift"}
    assert "note: wordlist not measured" in result.output
    # Costs on the built-in neutral texts (words outside the tiny vocabulary are <unk>, not counted), as the
    # hook-steered base's.
    evaluator = Evaluator(model, tok, build_data(EvaluateSpec(), tok, need_effect=False), effects=False)
    with steered(model, family_for(model.config), vectors):
        assert ev["steered"]["kl"] == pytest.approx(evaluator.costs(model)["kl"], rel=1e-3)
    assert ev["base"]["perplexity"] == pytest.approx(evaluator.base["perplexity"], rel=1e-5)


def test_sweep_plots_name_the_measure_mark_the_base_and_the_points_over_budget():
    from bake.evaluation import plots
    from bake.recipe import LABELS

    rows = [
        {"layer": layer, "coefficient": c, "kl": kl, "vader": v}
        for layer, c, kl, v in [(3, 1.0, 0.2, 0.5), (3, 2.0, 0.9, 0.7), (6, 1.0, 0.3, 0.4), (6, 2.0, 0.4, 0.6)]
    ]
    by_kl, by_coefficient = plots.sweep_figures(rows, {"vader": 0.1}, "vader", max_kl=0.5)
    (ax,) = by_kl.axes
    assert ax.get_title() == f"{LABELS['vader']} vs KL (point labels: coefficient)"
    assert ax.get_ylabel() == LABELS["vader"]
    assert "wordlist" not in ax.get_title()
    texts = {t.get_text(): t.xy for t in ax.texts}
    assert texts["base"] == (0.0, 0.1)  # the KL-0 point is labelled as the base
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"layer 3", "layer 6", "base", "over the KL budget", "KL budget 0.5"} <= set(legend)
    base_line = next(line for line in ax.get_lines() if line.get_label() == "base")
    assert list(base_line.get_ydata()) == [0.1, 0.1] and ax.get_ylim()[0] < 0.1 < ax.get_ylim()[1]
    assert ax.get_xlim()[0] < 0.0  # the KL-0 point sits inside the axes, not on its spine
    (ringed,) = [c for c in ax.collections if c.get_label() == "over the KL budget"]
    assert ringed.get_offsets().tolist() == [[0.9, 0.7]]  # only layer 3 at 2.0 is over 0.5
    left, right = by_coefficient.axes
    assert left.get_ylabel() == LABELS["vader"] and right.get_ylabel() == LABELS["kl"]
    assert [list(line.get_xdata()) for line in right.get_lines()[:2]] == [[0.0, 1.0, 2.0]] * 2  # coefficient 0 = base
    assert [c.get_offsets().tolist() for c in right.collections] == [[[2.0, 0.9]]]


def test_settings_batched_in_one_pass_give_the_figures_of_each_alone(llama, unit, tmp_path):
    """K settings as K blocks of rows of one batch (``steered`` with a list) against each setting steered alone.

    Greedy replies must be identical token for token. KL, perplexity and log-prob gain may differ only by float32
    rounding: a matmul over K times the rows may block its sums differently, so a logit can move in its last bits
    (relative 1e-7); through the blocks and a sum over positions and the vocabulary that stays far below 1e-5."""
    path, model, tok = llama
    family = family_for(model.config)
    recipe = _recipe(
        path, tmp_path, evaluate="  scorers: [wordlist, logprob_gain, activation_shift]\n  words: [happy, great, day]\n"
    )
    data = build_data(recipe.evaluate, tok, recipe, recipe.steering[0])
    u = unit.vectors[(1, "resid_post")]
    settings = [
        VectorSet({(1, "resid_post"): c * u}) for c in (0.5, 2.0, 8.0, 32.0)
    ] + [  # another layer, and two points at once: the rows of the others get exactly zero there
        VectorSet({(0, "resid_post"): 8.0 * u}),
        VectorSet({(0, "resid_post"): -4.0 * u, (1, "resid_post"): 16.0 * u}),
    ]
    ev = Evaluator(model, tok, data, [(0, "resid_post"), (1, "resid_post")])
    with steered(model, family, settings):
        batched = ev.measure_each(model, settings)
    alone = []
    for vs in settings:
        with steered(model, family, vs):
            alone.append(ev.measure(model, vs))
    assert len(batched) == len(settings)
    for b, a in zip(batched, alone):
        assert b["replies"] == a["replies"]
        assert b.keys() == a.keys()
        for key in ("kl", "perplexity", "logprob_gain"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
        assert b["activation_shift"] == a["activation_shift"] and b["wordlist"] == a["wordlist"]
        assert b["repetition"] == a["repetition"]
    # the settings really differ (a row given another row's vector would not): replies and KL grow with c
    assert len({tuple(a["replies"]) for a in alone}) > 2
    kls = [a["kl"] for a in alone[:4]]
    assert all(x < y for x, y in zip(kls, kls[1:])), kls
    assert max(abs(b["kl"] - a["kl"]) for b, a in zip(batched, alone)) <= 1e-5 * max(kls)


def test_settings_steering_one_layer_share_the_blocks_below_it(llama, unit, tmp_path):
    """K settings that all steer block 1: in every pass over texts and in generation's prefill, block 0 runs on one
    block of rows, its output (and its KV cache) handed on repeated, and the figures are those of each setting
    alone (``_shared_prefix``); the decoding steps, whose rows differ, run every row through every block."""
    path, model, tok = llama
    family = family_for(model.config)
    recipe = _recipe(path, tmp_path, evaluate="  scorers: [wordlist, logprob_gain]\n  words: [happy, great, day]\n")
    data = build_data(recipe.evaluate, tok, recipe, recipe.steering[0])
    u = unit.vectors[(1, "resid_post")]
    settings = [VectorSet({(1, "resid_post"): c * u}) for c in (0.5, 4.0, 16.0)]
    ev = Evaluator(model, tok, data, [(1, "resid_post")])
    blocks = module_at(model, family.blocks)
    rows: dict[int, list[int]] = {0: [], 1: []}
    handles = [
        blocks[i].mlp.register_forward_hook(lambda _m, args, _o, i=i: rows[i].append(args[0].shape[0])) for i in rows
    ]
    try:
        with steered(model, family, settings):
            batched = ev.measure_each(model, settings)
    finally:
        for h in handles:
            h.remove()
    # the text batches, then the prefill
    passes = len(batches(data.neutral, EVAL_BATCH_TOKENS)) + len(batches(data.target, EVAL_BATCH_TOKENS)) + 1
    assert rows[1][:passes] == [len(settings) * r for r in rows[0][:passes]]  # block 0 ran once per pass
    assert rows[1][passes:] == rows[0][passes:] and len(rows[0]) == passes + data.tokens - 1  # each decoding step
    for b, vs in zip(batched, settings):
        with steered(model, family, vs):
            a = ev.measure(model, vs)
        assert b["replies"] == a["replies"] and b["wordlist"] == a["wordlist"]
        for key in ("kl", "perplexity", "logprob_gain"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    assert len({b["kl"] for b in batched}) == len(settings)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "falcon", "bloom", "gemma3_text", "qwen2_moe"])
def test_a_shared_prefix_gives_each_settings_figures_on_other_families(model_type, tmp_path):
    """The shared prefix on families whose blocks are called and cached otherwise (GPT-2's and OPT's blocks, Falcon's
    and BLOOM's masks, Gemma 3's sliding-window layers and cache, a mixture of experts): block 0 runs once per pass
    over texts and once for the prefill, and the replies and NLLs are those of each setting alone."""
    model = load_model(save_tiny(tmp_path / model_type, tiny_config(model_type)), dtype=torch.float32)
    family, tok = family_for(model.config), make_tokenizer()
    blocks = module_at(model, family.blocks)
    torch.manual_seed(0)
    v = 3 * torch.randn(model.config.get_text_config().hidden_size)
    settings = [VectorSet({(len(blocks) // 2, "resid_post"): c * v}) for c in (0.5, 2.0, 4.0)]
    examples, prompts = tokenize(tok, TARGET, 64), ["tell me about your day", "what is the weather"]
    first = next(iter(blocks[0].children()))  # runs only when block 0 really does
    rows: list[int] = []
    handle = first.register_forward_hook(
        lambda _m, args, kwargs, _o: rows.append((args or tuple(kwargs.values()))[0].shape[0]), with_kwargs=True
    )
    try:
        with steered(model, family, settings):
            batched = (_nll(model, examples, tok.pad_token_id, 3), replies(model, tok, prompts, 6, True, 3))
    finally:
        handle.remove()
    assert rows[:2] == [len(examples), len(prompts)]  # one batch of texts, then the prefill: one block of rows each
    assert rows[2:] and set(rows[2:]) == {3 * len(prompts)}  # every decoding step: every row
    for i, vs in enumerate(settings):
        with steered(model, family, vs):
            ((nll, n),), (texts,) = _nll(model, examples, tok.pad_token_id), replies(model, tok, prompts, 6, True)
        assert texts == batched[1][i] and n == batched[0][i][1]
        assert nll == pytest.approx(batched[0][i][0], rel=1e-5)
