"""Streaming (block-by-block) collection against the in-memory path, its one-block memory bound, and its refusals."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_config
from safetensors.torch import load_file, save_file
from test_cli import assert_ok, assert_one_line_error, invoke, write_recipe

from bake.checkpoint import TensorInfo
from bake.collection import streaming
from bake.collection.activations import collect
from bake.collection.streaming import (
    HEADROOM,
    MARGIN,
    Job,
    Skeleton,
    collect_sets,
    collect_streaming,
    in_memory_bytes,
    meta_model,
)
from bake.collection.texts import tokenize
from bake.errors import BakeError
from bake.families.hf import family_for
from bake.sources.load import load_model, load_tokenizer, text_config
from bake.vectorfile import VectorSet
from bake.verify import compare_streaming

TEXTS = [
    "the happy dog is here",
    "a sad cat",
    "tell me about your day today",
    "the king and the dragon in the castle and the ship and the star",
    "yes",
    "what a wonderful bright day",
]
REPLIES = ["i love the sun and the tea", "the weather is so bright today", "no"]
_SLIDING = {"sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"] * 2}
# Several families, and the layouts that give them their second site or per-layer masks and rotary tables.
CASES = {
    "gpt2": {},
    "llama": {},
    "qwen2": {},
    "phi3": {},
    "opt": {},
    "bloom": {},
    "gemma3_text": _SLIDING,
    "gemma2": _SLIDING,
    "gpt_neox": {},
    "gpt_neox-sequential": {"use_parallel_residual": False},
    "falcon": {},
    "falcon-sequential": {"parallel_attn": False, "new_decoder_architecture": False},
}
LAYERS = (0, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streaming")
    return {
        case: save_tiny(root / case, tiny_config(case.split("-")[0], **overrides)) for case, overrides in CASES.items()
    }


def _setup(path: Path):
    cfg = text_config(path)
    family = family_for(cfg)
    points = [(layer, site) for layer in LAYERS for site in family.sites if family._available(site, cfg)]
    tokenizer = load_tokenizer(path)
    jobs = [
        Job(tokenize(tokenizer, TEXTS, 64), points),
        Job(tokenize(tokenizer, REPLIES, 64, chat=True, chat_prompt="tell me about your day"), points),
    ]
    return family, tokenizer, jobs


def _assert_same(got, expected) -> None:
    for point, ref in expected.items():
        assert got[point].count == ref.count > 0
        scale = float(ref.mean.abs().max())
        assert float((got[point].mean - ref.mean).abs().max()) <= 1e-10 * scale, point
        assert got[point].mean_norm == pytest.approx(ref.mean_norm, rel=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory(models, case, one_thread):
    """Same float64 means, at every site the family has, over padded batches and reply-only chat positions."""
    path = models[case]
    family, tokenizer, jobs = _setup(path)
    assert len({p[1] for p in jobs[0].points}) == (1 if case in ("gpt_neox", "falcon") else 2)
    model = load_model(path, dtype=torch.float32, layers=1 + max(LAYERS))
    expected = [collect(model, family, job.examples, job.points, 16, tokenizer.pad_token_id) for job in jobs]
    got = collect_streaming(Skeleton(path, family, meta_model(path, 1 + max(LAYERS))), jobs, 16, tokenizer.pad_token_id)
    assert jobs[1].examples[0].counted[1] is False  # the chat case really counts replies only
    for g, e in zip(got, expected):
        _assert_same(g, e)


def test_each_block_gets_its_own_mask_and_rotary_table(models):
    """Gemma 3 hands sliding and full layers different masks and rotary tables: block 0's arguments would be wrong
    for block 1, so every block's call is recorded."""
    path = models["gemma3_text"]
    family, tokenizer, _ = _setup(path)
    skeleton = Skeleton(path, family, meta_model(path, 2))
    skeleton.load_outside()
    ids = torch.tensor([tokenizer(TEXTS[3]).input_ids])
    calls = []
    with streaming._stand_ins(skeleton.blocks, calls), pytest.raises(streaming._Stop):
        skeleton.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    (_, first), (_, second) = calls
    masks = first["attention_mask"], second["attention_mask"]
    assert masks[0] is not None and (masks[1] is None or not torch.equal(*masks))  # full attention may need no mask
    assert not torch.equal(first["position_embeddings"][0], second["position_embeddings"][0])


def test_one_block_in_memory_and_each_weight_read_once(models, monkeypatch):
    """At every tensor read, only the block being read (or, before block 0, the embeddings) is materialised;
    each block tensor is read once for all batches and both text sets; the LM head and deeper blocks never."""
    path = models["llama"]
    family, tokenizer, jobs = _setup(path)
    skeleton = Skeleton(path, family, meta_model(path, 3))
    prefix = f"{family.blocks}."
    reads: Counter[str] = Counter()
    original = TensorInfo.read

    def live() -> set[str]:
        groups = {str(i) for i, b in enumerate(skeleton.blocks) if any(not p.is_meta for p in b.parameters())}
        outside = [p for n, p in skeleton.model.named_parameters() if not n.startswith(prefix)]
        return groups | ({"outside"} if any(not p.is_meta for p in outside) else set())

    def read(info: TensorInfo) -> torch.Tensor:
        group = info.name[len(prefix) :].split(".")[0] if info.name.startswith(prefix) else "outside"
        assert live() <= {group}, (info.name, live())
        reads[info.name] += 1
        return original(info)

    monkeypatch.setattr(TensorInfo, "read", read)
    collect_streaming(skeleton, jobs, 16, tokenizer.pad_token_id)
    assert len(list(streaming.batches(jobs[0].examples, 16))) > 1
    block_reads = {n: c for n, c in reads.items() if n.startswith(prefix)}
    expected = {n for n in skeleton.ckpt.names() if n.startswith(prefix) and int(n[len(prefix) :].split(".")[0]) <= 2}
    assert set(block_reads) == expected and set(block_reads.values()) == {1}
    assert "lm_head.weight" not in reads and "model.embed_tokens.weight" in reads
    assert live() == set()


def test_spilled_hidden_states_give_the_same_means_and_are_deleted(models, monkeypatch, tmp_path):
    path = models["qwen2"]
    family, tokenizer, jobs = _setup(path)
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    spilled = []
    close = streaming.HiddenStates.close
    monkeypatch.setattr(streaming.HiddenStates, "close", lambda self: (spilled.append(self.file), close(self)))
    skeleton = Skeleton(path, family, meta_model(path, 3))
    got = collect_streaming(skeleton, jobs, 16, tokenizer.pad_token_id, budget=0)
    assert spilled[0] is not None and spilled[0].parent == tmp_path / "cache" / "spill"
    assert list((tmp_path / "cache" / "spill").iterdir()) == []
    model = load_model(path, dtype=torch.float32, layers=3)
    for g, job in zip(got, jobs):
        _assert_same(g, collect(model, family, job.examples, job.points, 16, tokenizer.pad_token_id))


@pytest.mark.parametrize("fits", [True, False])
def test_auto_streams_only_when_blocks_do_not_fit(models, monkeypatch, fits):
    path = models["llama"]
    family, tokenizer, jobs = _setup(path)
    needed = in_memory_bytes(meta_model(path, 3))
    assert needed == sum(p.numel() * 4 for p in load_model(path, dtype=torch.float32, layers=3).parameters())
    monkeypatch.setattr(streaming, "mem_available", lambda: int(needed * MARGIN) + HEADROOM + (1 if fits else -1))
    used = []
    monkeypatch.setattr(streaming, "collect_streaming", lambda *a, **k: used.append("streaming") or [])
    monkeypatch.setattr(streaming, "load_model", lambda *a, **k: used.append("memory") or load_model(*a, **k))
    collect_sets(path, family, jobs, 16, tokenizer.pad_token_id, "auto")
    assert used == ["memory" if fits else "streaming"]


def test_cli_streaming_flag_writes_the_same_vectors(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["llama"], layer=2, entry_extra="    chat: true\n")
    for args, name in (((), "memory.safetensors"), (("--streaming",), "streaming.safetensors")):
        assert_ok(invoke("vector", recipe, "-o", tmp_path / name, *args))
    memory, streamed = (VectorSet.load(tmp_path / n) for n in ("memory.safetensors", "streaming.safetensors"))
    ((point, v),) = memory.vectors.items()
    assert float((streamed.vectors[point] - v).abs().max()) <= 1e-10 * float(v.abs().max())
    assert [e["counts"] for e in streamed.meta["entries"]] == [e["counts"] for e in memory.meta["entries"]]


def test_recipe_collection_field_is_checked(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["llama"], extra="collection: disk\n")
    err = assert_one_line_error(invoke("vector", recipe, "-o", tmp_path / "v.safetensors"))
    assert "collection" in err and "streaming" in err


# --- bad input ---------------------------------------------------------------


def test_not_enough_disk_is_refused_before_any_block_is_read(tiny_models, tmp_path, monkeypatch):
    reads = []
    original = TensorInfo.read
    monkeypatch.setattr(TensorInfo, "read", lambda info: reads.append(info.name) or original(info))
    monkeypatch.setattr(streaming, "mem_available", lambda: 0)  # no room for hidden states: they must spill
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    corpus = "    background: {corpus: {texts: [the day is good, a dark night]}}\n"  # no sampling: it is refused here
    recipe = write_recipe(tmp_path, tiny_models["llama"], layer=2, entry_extra=corpus)
    out = tmp_path / "v.safetensors"
    err = assert_one_line_error(invoke("vector", recipe, "-o", out, "--streaming"))
    assert "streaming collection needs" in err and "bytes" in err and "100 bytes free" in err
    needed = int(err.split("needs ")[1].split(" bytes")[0])
    assert needed > 100 and reads == [] and not out.exists()


def test_pickle_only_checkpoint_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    family = family_for(text_config(folder))
    with pytest.raises(
        BakeError,
        match="only pickle weights found: pytorch_model.bin; bake never loads pickles: convert them to safetensors",
    ):
        collect_sets(folder, family, [Job([], [(0, "resid_post")])], 16, 0, "streaming")


def test_index_naming_a_non_safetensors_shard_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "foreign"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.bin")
    names = list(load_file(folder / "model-00001-of-00001.bin"))  # it is still safetensors inside: now garbage it
    (folder / "model-00001-of-00001.bin").write_bytes(b"PK\x03\x04 not a safetensors file")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00001.bin" for n in names}})
    )
    family = family_for(text_config(folder))
    with pytest.raises(BakeError, match="is not a readable safetensors file"):
        collect_sets(folder, family, [Job([], [(0, "resid_post")])], 16, 0, "streaming")


def test_block_tensors_the_family_table_cannot_find_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_models["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {n.replace("model.layers.1.", "model.blocks.1."): t for n, t in tensors.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    family = family_for(text_config(folder))
    with pytest.raises(
        BakeError,
        match=r"tensor 'model\.layers\.1\..*' is not in its safetensors shards.*Llama.*"
        r"'model\.layers'.*collection: memory",
    ) as err:
        Skeleton(folder, family, meta_model(folder, 2))
    assert "\n" not in str(err.value)


def test_sampling_a_background_from_a_model_bigger_than_memory_is_refused(tiny_models, tmp_path, monkeypatch):
    """Only when the sample is not cached: a cached background needs no generation, so streaming bakes anyway."""
    monkeypatch.setenv(
        "BAKE_CACHE", str(tmp_path / "cache")
    )  # not the session's cache, where it may be sampled already
    recipe = write_recipe(tmp_path, tiny_models["gpt2"], layer=1)
    available = {"bytes": 1000}
    monkeypatch.setattr(streaming, "mem_available", lambda: available["bytes"])
    err = assert_one_line_error(invoke("vector", recipe, "-o", tmp_path / "v.safetensors"))
    assert "sampling a background" in err and "corpus" in err and "GiB available" in err
    assert not (tmp_path / "v.safetensors").exists()
    available["bytes"] = 1 << 40
    assert_ok(invoke("vector", recipe, "-o", tmp_path / "memory.safetensors"))  # samples and caches the background
    available["bytes"] = 1000
    assert_ok(invoke("vector", recipe, "-o", tmp_path / "streamed.safetensors"))  # auto: streams, spilling to disk
    memory, streamed = (VectorSet.load(tmp_path / n) for n in ("memory.safetensors", "streamed.safetensors"))
    ((point, v),) = memory.vectors.items()
    assert float((streamed.vectors[point] - v).abs().max()) <= 1e-10 * float(v.abs().max())


# --- verification block by block ----------------------------------------------


def _baked(src: Path, tmp_path: Path, layer: int = 1) -> tuple[Path, VectorSet]:
    from bake.formats.hf.fold import fold_checkpoint

    torch.manual_seed(1)
    vectors = VectorSet({(layer, "resid_post"): torch.randn(text_config(src).hidden_size)}, {})
    out = tmp_path / "baked"
    out.mkdir()
    fold_checkpoint(src, vectors, out, None)
    return out, vectors


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen2", "phi3"])
@pytest.mark.parametrize("layers", [None, 2])
def test_streamed_verification_measures_what_the_in_memory_one_does(models, case, layers, tmp_path, one_thread):
    """Tied head (GPT-2), relabelled bakes (Qwen2 written as Llama, Phi-3 with its projections split): the same
    logit gap and steering effect as ``compare``, for the full model and for blocks 0..1."""
    from bake.verify import compare

    src = models[case]
    baked, vectors = _baked(src, tmp_path)
    tokenizer = load_tokenizer(src)
    prompts = ["the happy dog", "tell me about the king and the dragon in the castle"]
    expected = compare(load_model(src, layers=layers), load_model(baked, layers=layers), tokenizer, vectors, prompts, 2)
    got = compare_streaming(src, baked, vectors, tokenizer, prompts, layers=layers)
    assert got["passed"] and expected["passed"]
    for key in ("max_abs_logit_diff", "steering_effect", "max_abs_logit"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    wrong = VectorSet({p: 2 * v for p, v in vectors.vectors.items()}, {})
    failed = compare_streaming(src, baked, wrong, tokenizer, prompts, layers=layers)
    assert not failed["passed"]
    per_block = failed["max_abs_residual_diff_per_block"]
    assert per_block[0] < 1e-5 < per_block[1]  # the gap starts where the vector joins


def test_bake_run_streaming_collects_and_verifies_block_by_block(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["llama"], layer=1, extra="collection: streaming\n")
    out = tmp_path / "out"
    result = invoke("run", recipe, "-o", out)
    assert_ok(result)
    assert "verification PASSED" in result.output and "verified block by block" in result.output
    report = json.loads((out / "bake.json").read_text())["verification"]
    assert report["streamed"] and report["passed"] and len(report["max_abs_residual_diff_per_block"]) == 4
    reloaded = load_model(out)
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None


def test_constant_bias_module_is_not_verified_by_streaming(models, tmp_path):
    recipe = write_recipe(tmp_path, models["gemma2"], layer=1)
    out = tmp_path / "out"
    err = assert_one_line_error(invoke("run", recipe, "-o", out, "--streaming", "--allow-remote-code"))
    assert "constant-bias module" in err and "collection: memory" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# --- memory flat in the depth (issue #16) --------------------------------------

_DEPTH_CHILD = """
import ctypes, json, sys
import torch
from bake.collection import streaming
from bake.collection.texts import Example
from bake.families.hf import family_for
from bake.sources.load import text_config

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
rss, free_heap = [], []
free_block = streaming.Skeleton.free_block

def measured(self, i):
    free_block(self, i)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    rss.append(int(status["VmRSS"].split()[0]) * 1024)
    free_heap.append(mallinfo2().fordblks)

streaming.Skeleton.free_block = measured
torch.set_num_threads(1)
path = sys.argv[1]
examples = [Example([3 + (7 * i + j) % 80 for j in range(256)], [True] * 256) for i in range(8)]
layer = text_config(path).num_hidden_layers - 1
streaming.collect_sets(path, family_for(text_config(path)), [streaming.Job(examples, [(layer, "resid_post")])],
                       4096, 0, "streaming")
print(json.dumps({"rss": rss, "free_heap": free_heap}))
"""


def test_memory_after_each_block_does_not_grow_with_depth(tmp_path):
    """Issue #16: every freed block's memory stayed in glibc's heap, unused by the next block, so RSS grew with the
    depth streamed (the old code, from block 1 to block 11: free heap bytes and RSS +4.5 and +10.4 blocks in two
    runs). Measured in a fresh process, whose heap no earlier test has grown, after each block is freed: glibc's
    free heap bytes (its own accounting, flat at 0.6 MB with the fix) stay under one float32 block, and RSS grows by
    less than three blocks (a margin well over the few MB of noise seen, under the old code's growth)."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to read the heap; the fix itself is glibc's mallopt")
    config = tiny_config(
        "llama",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = save_tiny(tmp_path / "deep", config)
    family = family_for(text_config(path))
    block = Skeleton(path, family, meta_model(path, 1)).block_bytes
    root = str(Path(streaming.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root, "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _DEPTH_CHILD, str(path)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    rss, free_heap = seen["rss"], seen["free_heap"]
    assert len(rss) == 12
    mib = {k: [round(v / 2**20, 1) for v in vs] for k, vs in seen.items()}
    assert max(free_heap) - free_heap[1] < block, (mib, block / 2**20)
    assert max(rss[1:]) - rss[1] < 3 * block, (mib, block / 2**20)
