"""Choosing a steering by measurement: layer x coefficient sweeps, ``coefficient: auto``, method comparison.

Everything steers the base model in memory with hooks (``bake.verify.steered``); nothing is baked. A
vector scales linearly with its coefficient, so activations are collected once (one pass for all
layers of a sweep, all methods of a comparison) and every coefficient reuses them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bake.checkpoint import check_output, staged_output
from bake.collection.measure import MeasuredVectors, measure_vectors
from bake.errors import BakeError
from bake.evaluation import plots
from bake.evaluation.evaluate import COSTS, EvalData, Evaluator, build_data, target_source
from bake.families.hf import Site, family_for
from bake.recipe import Recipe, Steering, TextSource
from bake.sources.load import load_model, load_tokenizer, text_config
from bake.sources.resolve import resolve_model
from bake.vectorfile import VectorSet
from bake.verify import steered


def _progress(items: Iterable[Any], desc: str) -> tqdm:
    """A progress bar on stderr over a grid."""
    return tqdm(items, desc=desc, leave=False)


def _entry(recipe: Recipe, name: str | None) -> Steering:
    """The steering entry to work on: the named one, or the first."""
    if name is None:
        return recipe.steering[0]
    for entry in recipe.steering:
        if entry.name == name:
            return entry
    raise BakeError(f"no steering entry named {name!r}: the recipe has {', '.join(e.name for e in recipe.steering)}")


class _Lab:
    """The full base model, its tokenizer and an evaluator: what every experiment here steers and measures."""

    def __init__(
        self, recipe: Recipe, entry: Steering, points: Sequence[tuple[int, Site]] = (), effects: bool = True
    ) -> None:
        source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
        self.model = load_model(source.path, dtype=torch.float32)
        self.family = family_for(self.model.config)
        tokenizer = load_tokenizer(source.path)
        self.data: EvalData = build_data(recipe.evaluate, tokenizer, recipe, entry, source.key, lambda: self.model)
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            self.evaluator = Evaluator(self.model, tokenizer, self.data, list(points), effects)

    def measure(self, settings: list[VectorSet], desc: str = "", costs_only: bool = False) -> list[dict[str, Any]]:
        """Every figure (or KL and perplexity only) of each setting, ``SETTINGS_PER_PASS`` settings batched per
        pass: same-length rows of one forward, so K settings cost about one pass of K times the rows."""
        figures: list[dict[str, Any]] = []
        chunks = [settings[i : i + SETTINGS_PER_PASS] for i in range(0, len(settings), SETTINGS_PER_PASS)]
        for chunk in _progress(chunks, desc) if desc else chunks:
            with steered(self.model, self.family, chunk):
                if costs_only:
                    figures += self.evaluator.costs_each(self.model, len(chunk))
                else:
                    figures += self.evaluator.measure_each(self.model, chunk)
        return figures


# Settings measured together in one batched pass: the default grid of evaluate.coefficients in one. Memory grows
# with it (full-vocabulary log-probs of every setting's rows of a batch: about 0.1 GB per setting on SmolLM2).
SETTINGS_PER_PASS = 10


def _within(rows: list[dict[str, Any]], max_kl: float, what: str, setting: Callable[[dict], str]) -> list:
    """The rows whose KL is within ``max_kl``; none is one line naming the closest (``what``: the field, and what
    was tried)."""
    fits = [r for r in rows if r["kl"] <= max_kl]
    if not fits:
        least = min(rows, key=lambda r: r["kl"])
        raise BakeError(
            f"{what} keeps KL within evaluate.max_kl {max_kl:g} (smallest KL {least['kl']:.3g} at {setting(least)}): "
            "add smaller coefficients or raise max_kl"
        )
    return fits


def choose_auto(
    recipe: Recipe, measured: MeasuredVectors, records: dict[int, dict[str, Any]] | None = None
) -> VectorSet:
    """``coefficient: auto``: each such entry (in order, with the entries before it in place) gets the largest
    coefficient of ``evaluate.coefficients`` whose KL(base ‖ steered) is within ``evaluate.max_kl``; the grid,
    its KL and perplexity figures and the choice go into the entry's metadata (and so the manifest) as ``auto``,
    beside what ``records`` already holds for it."""
    spec = recipe.evaluate
    records = {i: dict(r) for i, r in (records or {}).items()}
    autos = [i for i, e in enumerate(recipe.steering) if e.coefficient == "auto"]
    coefficients = [0.0 if e.coefficient == "auto" else e.coefficient for e in recipe.steering]
    lab = _Lab(recipe, recipe.steering[autos[0]], effects=False)
    for i in autos:
        trials = [measured.scaled([c if j == i else x for j, x in enumerate(coefficients)]) for c in spec.coefficients]
        grid = [{"coefficient": c, **kl} for c, kl in zip(spec.coefficients, lab.measure(trials, costs_only=True))]
        what = f"steering.{i}.coefficient: auto: no coefficient in evaluate.coefficients {spec.coefficients}"
        fits = _within(grid, spec.max_kl, what, lambda g: f"{g['coefficient']:g}")
        chosen = max(fits, key=lambda g: g["coefficient"])
        coefficients[i] = chosen["coefficient"]
        records.setdefault(i, {})["auto"] = {
            "max_kl": spec.max_kl,
            "chosen": chosen["coefficient"],
            "kl": chosen["kl"],
            "perplexity": chosen["perplexity"],
            "base_perplexity": lab.evaluator.base["perplexity"],
            "grid": grid,
            "neutral_texts": lab.data.info["neutral_texts"],
        }
    return measured.scaled(coefficients, records)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def tables(rows: list[dict[str, Any]], keys: list[str]) -> tuple[str, str]:
    """The same rows as CSV (full precision) and as a markdown table (4 significant digits)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_number(r.get(k)) for k in keys) + " |" for r in rows]
    return buffer.getvalue(), "\n".join(lines) + "\n"


def _write(stage: Path, stem: str, rows: list[dict[str, Any]], keys: list[str], record: dict[str, Any]) -> str:
    csv_text, markdown = tables(rows, keys)
    (stage / f"{stem}.csv").write_text(csv_text)
    (stage / f"{stem}.md").write_text(markdown)
    (stage / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return markdown


@dataclass
class Report:
    """What a sweep or comparison measured: the rows, the base, the markdown table and the files written."""

    path: Path
    rows: list[dict[str, Any]]
    base: dict[str, Any]
    table: str
    data: EvalData
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _base_row(base: dict[str, Any], **labels: Any) -> dict[str, Any]:
    return {
        **labels,
        "coefficient": 0.0,
        "norm": 0.0,
        "relative_norm": 0.0,
        **{k: v for k, v in base.items() if k != "replies"},
    }


def is_report_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``sweep`` or ``compare`` wrote (its record is there): what ``--force`` may
    replace."""
    return any((path / f"{kind}.json").is_file() and (path / f"{kind}.md").is_file() for kind in ("sweep", "compare"))


def _check_out(recipe: Recipe, out: Path, force: bool) -> None:
    """Refuse the output before any work: first as a path, then (once the model is resolved) against the source."""
    check_output(out, force, is_report_folder)
    check_output(out, force, is_report_folder, [resolve_model(recipe.model, recipe.revision, recipe.base_dir).path])


def _grid(
    recipe: Recipe, entry: Steering, layers: list[int], coefficients: list[float], what: str
) -> tuple[_Lab, list[dict[str, Any]]]:
    """Every figure of ``entry`` at each layer x coefficient: activations collected once for all layers, settings
    batched (``what`` names the layers in the error when one is outside the model)."""
    blocks = text_config(resolve_model(recipe.model, recipe.revision, recipe.base_dir).path).num_hidden_layers
    outside = [layer for layer in layers if not 0 <= layer < blocks]
    if outside:
        raise BakeError(f"{what} {outside} are outside the model's blocks 0..{blocks - 1}: pick layers in range")
    grid = [
        entry.model_copy(update={"name": f"{entry.name}.{layer}", "layer": layer, "coefficient": 1.0})
        for layer in layers
    ]
    measured = measure_vectors(recipe.model_copy(update={"steering": grid}))
    lab = _Lab(recipe, entry, measured.points)
    cells = [(i, c) for i in range(len(layers)) for c in coefficients]
    figures = lab.measure([VectorSet({measured.points[i]: c * measured.units[i]}) for i, c in cells], "sweep")
    rows = [
        {
            "layer": layers[i],
            "coefficient": c,
            "norm": abs(c) * measured.entries[i]["unscaled_norm"],
            "relative_norm": abs(c) * measured.entries[i]["unscaled_norm"] / measured.entries[i]["mean_residual_norm"],
            **f,
        }
        for (i, c), f in zip(cells, figures)
    ]
    return lab, rows


def _headline(lab: _Lab, what: str) -> str:
    """The effect a choice is made on, refused when no scorer can be measured (each skipped one says why)."""
    if lab.data.headline is None:
        skipped = "; ".join(f"{k}: {v}" for k, v in lab.data.skipped.items())
        raise BakeError(f"{what}: no effect scorer can be measured here ({skipped}): fix one of evaluate.scorers")
    return lab.data.headline


def choose_layers(recipe: Recipe) -> tuple[Recipe, dict[int, dict[str, Any]]]:
    """``layer: auto``: each such entry, swept alone over ``evaluate.layers`` x its coefficient (every one of
    ``evaluate.coefficients`` when that is ``auto`` too), gets the layer of the setting with the most effect on the
    headline scorer, in ``evaluate.goal``'s direction, among those whose KL is within ``evaluate.max_kl``. Returns
    the recipe with those layers and, per entry, the record kept in its metadata as ``layer_auto``."""
    spec, steering, records = recipe.evaluate, list(recipe.steering), {}
    for i, entry in enumerate(recipe.steering):
        if entry.layer != "auto":
            continue
        coefficients = spec.coefficients if entry.coefficient == "auto" else [entry.coefficient]
        lab, rows = _grid(recipe, entry, recipe.layers_of(entry), coefficients, "evaluate.layers")
        headline = _headline(lab, f"steering.{i}.layer: auto")
        what = f"steering.{i}.layer: auto: no setting of evaluate.layers x coefficients"
        fits = _within(rows, spec.max_kl, what, lambda r: f"layer {r['layer']}, {r['coefficient']:g}")
        best = max(fits, key=lambda r: toward(spec.goal) * r[headline])
        steering[i] = entry.model_copy(update={"layer": best["layer"]})
        records[i] = {
            "layer_auto": {
                "layers": recipe.layers_of(entry),
                "max_kl": spec.max_kl,
                "headline": headline,
                "goal": spec.goal,
                "chosen": best["layer"],
                "coefficient": best["coefficient"],
                "base": lab.evaluator.base[headline],
                "grid": [{k: r[k] for k in ("layer", "coefficient", "kl", headline)} for r in rows],
            }
        }
    return recipe.model_copy(update={"steering": steering}), records


def sweep(
    recipe: Recipe,
    out: str | Path,
    layers: list[int] | None = None,
    coefficients: list[float] | None = None,
    entry_name: str | None = None,
    force: bool = False,
) -> Report:
    """Measure one steering entry at every layer x coefficient: effect and cost per cell, against the base.

    Defaults: the entry's own layer, ``evaluate.coefficients``. Writes ``sweep.csv``/``.md``/``.json`` and
    ``effect_vs_kl.png``, ``coefficient.png`` to ``out`` (staged, renamed at the end).
    """
    out = Path(out)
    _check_out(recipe, out, force)
    plots.require()
    entry = _entry(recipe, entry_name)
    layers = sorted(set(layers or recipe.layers_of(entry)))
    coefficients = sorted(set(coefficients or recipe.evaluate.coefficients))
    lab, rows = _grid(recipe, entry, layers, coefficients, "layers")
    keys = ["layer", "coefficient", "norm", "relative_norm"] + list(COSTS) + lab.data.scorers
    base = lab.evaluator.base
    record = {
        "entry": entry.name,
        "site": entry.site,
        "method": entry.method,
        "layers": layers,
        "coefficients": coefficients,
        "max_kl": recipe.evaluate.max_kl,
        "data": lab.data.info,
        "skipped": lab.data.skipped,
        "base": base,
        "rows": rows,
    }
    with staged_output(out, force, ours=is_report_folder) as stage:
        table = _write(stage, "sweep", [_base_row(base, layer="base")] + rows, keys, record)
        files = plots.sweep_plots(rows, base, lab.data.headline, recipe.evaluate.max_kl, stage)
    return Report(out, rows, base, table, lab.data, [out / p.name for p in files], _notes(lab.data))


def _notes(data: EvalData) -> list[str]:
    notes = [f"{name} not measured: {why}" for name, why in data.skipped.items()]
    if data.info.get("target", "").startswith("the steering entry's own"):
        notes.append(
            "logprob_gain and activation_shift use the entry's own target texts (in-sample): set evaluate.target to "
            "hold some out"
        )
    return notes


Search = Generator[float, float, tuple[float, list[tuple[float, float]]]]


def _search(budget: float, start: float, ratio: float = 1.05, steps: int = 24) -> Search:
    """The largest coefficient whose KL is within ``budget``, assuming KL grows with the coefficient: double or
    halve from ``start`` until the budget is bracketed, then bisect geometrically to within ``ratio``. Yields each
    coefficient to try and is sent its KL; returns the coefficient and every (coefficient, KL) tried."""
    trace: list[tuple[float, float]] = []

    def within(c: float):
        kl = yield c
        trace.append((c, kl))
        return kl <= budget

    lo = hi = None
    c = start
    for _ in range(steps):
        if (yield from within(c)):
            lo = c
            if hi is not None:
                break
            c *= 2
        else:
            hi = c
            if lo is not None:
                break
            c /= 2
    if lo is None:
        raise BakeError(f"KL exceeds the budget {budget:g} even at coefficient {c:.3g}: raise max_kl")
    while hi is not None and hi / lo > ratio:
        mid = math.sqrt(lo * hi)
        if (yield from within(mid)):
            lo = mid
        else:
            hi = mid
    return lo, trace


def calibrate_all(
    kl_of: Callable[[list[tuple[int, float]]], list[float]], searches: list[Search]
) -> list[tuple[float, list[tuple[float, float]]]]:
    """Run the searches in lockstep: each round, every unfinished search's next coefficient is measured in one call
    ``kl_of([(search index, coefficient), ...])``, so the searches' KLs are batched; the same trials as one by one."""
    results: dict[int, tuple[float, list[tuple[float, float]]]] = {}
    pending = {}
    for i, search in enumerate(searches):
        pending[i] = next(search)
    while pending:
        asked = list(pending.items())
        for (i, _), kl in zip(asked, kl_of(asked)):
            try:
                pending[i] = searches[i].send(kl)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    return [results[i] for i in range(len(searches))]


def calibrate(
    kl_at: Callable[[float], float], budget: float, start: float, ratio: float = 1.05, steps: int = 24
) -> tuple[float, list[tuple[float, float]]]:
    """The largest coefficient whose KL is within ``budget`` (``_search``), measuring one coefficient at a time.
    Returns it and every (coefficient, KL) tried."""
    (result,) = calibrate_all(lambda asked: [kl_at(c) for _, c in asked], [_search(budget, start, ratio, steps)])
    return result


def _compare_entries(
    entry: Steering, recipe: Recipe, negative: str | None, prompt_pair: tuple[str, str] | None
) -> tuple[list[Steering], dict[str, str]]:
    """The four methods on the entry's data at its layer and site; methods without their data are skipped, with why."""
    target = target_source(entry)
    if entry.method == "actadd":
        raise BakeError(
            f"steering {entry.name!r} is actadd: compare needs texts that show the behaviour (an entry with target or "
            "positive texts)"
        )
    spec = recipe.evaluate.compare
    neg = TextSource(file=str(Path(negative).resolve())) if negative else spec.negative or entry.negative
    pair = prompt_pair or (
        (spec.positive_prompt, spec.negative_prompt) if spec.positive_prompt and spec.negative_prompt else None
    )
    common = {
        "layer": entry.layer,
        "site": entry.site,
        "coefficient": 1.0,
        "chat": entry.chat,
        "chat_prompt": entry.chat_prompt,
        "positions": entry.positions,
    }
    entries = [
        Steering(name="mean-centred", method="mean-centred", target=target, background=entry.background, **common),
        Steering(name="mean", method="mean", target=target, **common),
    ]
    skipped = {}
    if pair:
        entries.append(
            Steering(name="actadd", method="actadd", positive_prompt=pair[0], negative_prompt=pair[1], **common)
        )
    else:
        skipped["actadd"] = (
            "no prompt pair: pass --prompt-pair POS NEG or set evaluate.compare.positive_prompt/negative_prompt"
        )
    if neg is not None:
        entries.append(Steering(name="contrast", method="contrast", positive=target, negative=neg, **common))
    else:
        skipped["contrast"] = "no negative texts: pass --negative FILE or set evaluate.compare.negative"
    return entries, skipped


# Points on each method's curve, as fractions of its calibrated coefficient (the last one is at the budget).
CURVE = (0.25, 0.5, 0.75, 1.0)


def _at_budget(
    recipe: Recipe, entry: Steering, methods: list[Steering], budget: float
) -> tuple[_Lab, MeasuredVectors, list[tuple[float, list[tuple[float, float]]]]]:
    """Each method's vector measured and its largest coefficient within ``budget`` (with the KLs tried)."""
    measured = measure_vectors(recipe.model_copy(update={"steering": methods}))
    point = measured.points[0]
    lab = _Lab(recipe, entry, [point])
    found = calibrate_all(  # every method's search in lockstep: one batched KL pass per round
        lambda asked: [
            f["kl"] for f in lab.measure([VectorSet({point: c * measured.units[i]}) for i, c in asked], costs_only=True)
        ],
        # each search starts at a vector a quarter of the residual's size
        [_search(budget, 0.25 * m["mean_residual_norm"] / m["unscaled_norm"]) for m in measured.entries],
    )
    return lab, measured, found


# A method beats the entry's clearly when its headline change from the base, in the goal's direction, is at least
# this many times the entry's method's (or positive where the entry's is not).
CLEAR = 1.1


def toward(goal: str) -> float:
    """The sign that turns a change of the headline scorer into progress toward ``evaluate.goal``."""
    return 1.0 if goal == "raise" else -1.0


def clearly_beats(gain: float, other: float) -> bool:
    """Whether a change from the base of ``gain`` (toward the goal) clearly beats one of ``other``: it is real, and
    at least ``CLEAR`` times the other's (or the other's is none)."""
    return gain > 0 and (other <= 0 or gain >= CLEAR * other)


def verdict(rows: list[dict[str, Any]], method: str, headline: str, base: float, goal: str) -> str | None:
    """One line naming the method that clearly beats ``method`` on ``headline`` at the same KL budget, or None."""
    gain = {r["method"]: toward(goal) * (r[headline] - base) for r in rows}
    best = max(gain, key=gain.get)
    if best == method or not clearly_beats(gain[best], gain[method]):
        return None
    figure = {r["method"]: r[headline] for r in rows}
    return (
        f"at the same KL budget {best} {goal}s {headline} to {figure[best]:.3g} against {figure[method]:.3g} for "
        f"{method}, this entry's method (base {base:.3g}): see bake compare"
    )


def check_methods(recipe: Recipe) -> dict[str, Any]:
    """``evaluate.compare.on_run``: the methods of ``bake compare`` on the first entry's data, each at the largest
    coefficient within ``evaluate.max_kl``, and the ``verdict`` (None when no method clearly beats the entry's):
    the record ``bake run`` keeps in the entry's metadata as ``compare``."""
    entry, budget = recipe.steering[0], recipe.evaluate.max_kl
    methods, skipped = _compare_entries(entry, recipe, None, None)
    lab, measured, found = _at_budget(recipe, entry, methods, budget)
    point, headline = measured.points[0], _headline(lab, "evaluate.compare.on_run")
    figures = lab.measure([VectorSet({point: c * u}) for (c, _), u in zip(found, measured.units)])
    rows = [
        {"method": m["method"], "coefficient": c, "kl": f["kl"], headline: f[headline]}
        for m, (c, _), f in zip(measured.entries, found, figures)
    ]
    base = lab.evaluator.base[headline]
    note = verdict(rows, entry.method, headline, base, recipe.evaluate.goal)
    return {"max_kl": budget, "headline": headline, "base": base, "rows": rows, "skipped": skipped, "verdict": note}


def compare(
    recipe: Recipe,
    out: str | Path,
    entry_name: str | None = None,
    negative: str | None = None,
    prompt_pair: tuple[str, str] | None = None,
    max_kl: float | None = None,
    force: bool = False,
) -> Report:
    """Mean-centred vs uncentred mean vs ActAdd vs contrast on the same data, layer and site, each at the
    largest coefficient whose KL is within the same budget (``max_kl`` or ``evaluate.max_kl``).

    Writes ``compare.csv``/``.md``/``.json`` (rows at the budget) and ``compare.png`` (effect vs KL curves
    and effect at the budget) to ``out``.
    """
    out = Path(out)
    _check_out(recipe, out, force)
    plots.require()
    recipe = choose_layers(recipe)[0]  # methods are compared at one layer: layer: auto's
    entry = _entry(recipe, entry_name)
    budget = max_kl or recipe.evaluate.max_kl
    entries, skipped = _compare_entries(entry, recipe, negative, prompt_pair)
    lab, measured, found = _at_budget(recipe, entry, entries, budget)
    point, units = measured.points[0], measured.units
    searches = {m["method"]: trace for m, (_, trace) in zip(measured.entries, found)}
    points = [(i, f * c) for i, (c, _) in enumerate(found) for f in CURVE]
    figures = iter(lab.measure([VectorSet({point: c * units[i]}) for i, c in points], "curves"))
    curves: dict[str, list[dict[str, Any]]] = {}
    for (i, c), f in zip(points, CURVE * len(found)):
        m = measured.entries[i]
        curves.setdefault(m["method"], []).append(
            {
                "method": m["method"],
                "fraction": f,
                "coefficient": c,
                "norm": c * m["unscaled_norm"],
                "relative_norm": c * m["unscaled_norm"] / m["mean_residual_norm"],
                **next(figures),
            }
        )
    rows = [curve[-1] for curve in curves.values()]
    keys = ["method", "coefficient", "norm", "relative_norm"] + list(COSTS) + lab.data.scorers
    base = lab.evaluator.base
    record = {
        "entry": entry.name,
        "layer": entry.layer,
        "site": entry.site,
        "max_kl": budget,
        "data": lab.data.info,
        "skipped_methods": skipped,
        "skipped": lab.data.skipped,
        "base": base,
        "rows": rows,
        "curves": curves,
        "searches": {k: [{"coefficient": c, "kl": kl} for c, kl in v] for k, v in searches.items()},
    }
    with staged_output(out, force, ours=is_report_folder) as stage:
        table = _write(stage, "compare", [_base_row(base, method="base")] + rows, keys, record)
        files = [plots.compare_plot(curves, base, lab.data.headline, budget, stage / "compare.png")]
    notes = _notes(lab.data) + [f"{m} not compared: {why}" for m, why in skipped.items()]
    return Report(out, rows, base, table, lab.data, [out / p.name for p in files], notes)
