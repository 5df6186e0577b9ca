"""Layer-major ("streaming") collection: measure a model bigger than memory one block at a time.

The in-memory path (``bake.collection.activations.collect``) builds blocks 0..L and runs each batch through all
of them, so its memory grows with L. Here the loops are turned around: every batch of every text set
is embedded first; then block 0's tensors are read from the safetensors shards (header offsets, one
tensor at a time, never a whole shard), every batch's hidden states run through it, the requested
points are added to the same float64 running sums, and the block is freed before block 1 is read.
Each weight is read once, whatever the number of batches or text sets.

The blocks run as the model's own code, so every family of ``bake.families.hf`` works without
per-family code: the model is built on the meta device (no weights), and one embedding pass per batch,
with every block's forward replaced by a stand-in that records its call, captures exactly what the
model hands each block (attention mask, position embeddings, cache flags, other kwargs). Each real
block is later called with its own recorded arguments -- not block 0's for all, as GPTQ/AWQ-style
capture does: Gemma 2/3 and other sliding-window models give alternate layers another mask and
another rotary table. Sites are read by the same hooks as in memory (``record_points``), on the block
materialised in place inside the skeleton.

The rule and the budget:
- ``collection: auto`` streams when the in-memory path would not fit: blocks 0..L plus the embeddings
  and head, at float32 as collection computes (the shapes the shard headers hold), times ``MARGIN``,
  plus ``HEADROOM``, exceed MemAvailable (/proc/meminfo).
- Streaming holds the embeddings while embedding (freed afterwards), one block at float32, each
  batch's block arguments (masks, rotary tables: small next to the hidden states) and the hidden
  states between blocks: float32, sum over batches of rows x padded width x hidden x 4 bytes.
  These stay in memory when they take at most half of MemAvailable minus one block minus
  ``HEADROOM``; otherwise they go to one memory-mapped file under bake's cache (``BAKE_CACHE``),
  refused before any block is read when that disk lacks the bytes, and deleted at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bake.checkpoint import Checkpoint, TensorInfo
from bake.collection.activations import (
    Moments,
    _my_share,
    _Stop,
    batches,
    collect,
    first_tensor,
    module_at,
    padded,
    record_points,
)
from bake.collection.texts import Example
from bake.errors import BakeError
from bake.families.hf import Family, Site
from bake.recipe import Collection
from bake.sources.load import auto_class, load_model, truncated_config
from bake.sources.resolve import cache_dir

Point = tuple[int, Site]
HEADROOM = 1 << 30
"""Bytes kept free for the process itself, the block's forward temporaries and the OS."""
MARGIN = 1.25
"""The in-memory path's load overhead (transformers' loading copies, allocator slack)."""
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter (malloc.h)."""
MMAP_THRESHOLD = 1 << 17
"""Allocations from this size up (block tensors, hidden states, forward temporaries) get a mapping of their own:
glibc's default threshold, held fixed (1 MiB still left a slow heap growth from a short batch's temporaries)."""


@dataclass
class Job:
    """One text set and the points it is measured at."""

    examples: list[Example]
    points: list[Point]
    desc: str = "collecting"


def mem_available() -> int | None:
    """MemAvailable in bytes (Linux), or None where /proc/meminfo does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _float32_bytes(infos: dict[str, TensorInfo]) -> int:
    """Bytes these tensors take once floating ones are cast to float32 (as collection runs)."""
    return sum(
        math.prod(i.shape) * (4 if i.torch_dtype.is_floating_point else i.torch_dtype.itemsize) for i in infos.values()
    )


def meta_model(path: Path, layers: int | None) -> torch.nn.Module:
    """The float32 model (of blocks 0..layers-1 when given) built on the meta device: its structure, no weights."""
    config = truncated_config(path, layers)
    with torch.device("meta"):
        return auto_class(config).from_config(config, dtype=torch.float32).eval()


def in_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the in-memory path allocates for this (meta) model: blocks 0..L, embeddings and head in float32
    (the shapes the shard headers hold, at the dtype collection computes in)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@functools.cache
def unmap_freed_blocks() -> bool:
    """Make glibc hand a freed block's memory back to the OS (issue #16); whether it took. Process-wide, once.

    glibc's mmap threshold adapts: once a large tensor's mapping is freed it rises (up to 32 MiB), so later tensors
    below it are carved from the heap, and a freed block's heap chunks were neither returned nor reused by the next
    block (measured: bytes in use flat, free heap bytes growing by about a block per block), so RSS grew with the
    depth streamed. A fixed threshold (which turns the adapting off) maps each large tensor on its own, unmapped on
    free. No-op where the C library has no mallopt (it is glibc's and musl's)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False


class Skeleton:
    """The model (blocks 0..layers-1) built on the meta device, each tensor found in the shard headers.

    Refuses up front a checkpoint without safetensors shards, and one where a tensor the model needs
    (a block's, or the embeddings') is missing or has another shape. Blocks are loaded and freed in turn, so
    building one makes freed blocks go back to the OS (``unmap_freed_blocks``)."""

    def __init__(self, path: Path, family: Family, model: torch.nn.Module) -> None:
        unmap_freed_blocks()
        self.path, self.family, self.model = Path(path), family, model
        self.ckpt = Checkpoint.open(path)
        self.blocks = module_at(self.model, family.blocks)
        self.block_infos = [
            self._infos(f"{family.blocks}.{i}.", block.state_dict()) for i, block in enumerate(self.blocks)
        ]
        head = self.model.get_output_embeddings()
        self.tied = head is not None and head.weight is self.model.get_input_embeddings().weight
        self.head = next((name for name, m in self.model.named_modules() if m is head), "") if head is not None else ""
        state = self.model.state_dict()
        self.rest_infos = self._infos(
            "", {k: v for k, v in state.items() if not _under(k, family.blocks) and not _under(k, self.head)}
        )

    def _infos(self, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
        return {name: self._find(prefix + name, tuple(t.shape)) for name, t in state.items()}

    def _find(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        """The tensor by its module path, or without the base-model prefix (as GPT-2's own checkpoints store it, and
        wrappers their vision tower), or as a multimodal wrapper's checkpoints name its language model."""
        base = f"{self.model.base_model_prefix}."
        wrapped = self.family.wrapper.stored_names(name) if self.family.wrapper else ()
        for candidate in (name, name[len(base) :] if name.startswith(base) else None, *wrapped):
            info = self.ckpt.find(candidate) if candidate else None
            if info is not None:
                if info.shape != shape:
                    raise BakeError(
                        f"{str(self.path)!r}: tensor {candidate!r} has shape {list(info.shape)} but the "
                        f"config makes it {list(shape)}: the shards do not match config.json"
                    )
                return info
        raise BakeError(
            f"{str(self.path)!r}: tensor {name!r} is not in its safetensors shards, so streaming "
            f"cannot find the {self.family.name} weights (blocks under {self.family.blocks!r}): use "
            "'collection: memory' (transformers may map other names) or re-save the model with "
            "save_pretrained"
        )

    @property
    def block_bytes(self) -> int:
        return max(_float32_bytes(infos) for infos in self.block_infos)

    def load_outside(self, head: bool = False) -> None:
        """Materialise what runs before block 0 (embeddings, rotary tables) and after the last (final norm); the LM
        head only with ``head`` (a tied head shares the embeddings)."""
        self._fill_buffers(self.model, skip=self.family.blocks)
        self._assign(self.model, self.rest_infos)
        if head and self.head:
            module = module_at(self.model, self.head)
            state = {
                k: v
                for k, v in self.model.state_dict().items()
                if _under(k, self.head) and not (self.tied and k == f"{self.head}.weight")
            }
            self._assign(self.model, self._infos("", state))
            if self.tied:
                module.weight = self.model.get_input_embeddings().weight

    def free_outside(self) -> None:
        """Back to meta once every batch is embedded (no block is loaded then, so the whole model goes)."""
        self.model.to("meta")

    def load_block(self, i: int) -> torch.nn.Module:
        block = self.blocks[i]
        self._assign(block, self.block_infos[i])
        self._fill_buffers(block)
        return block

    def free_block(self, i: int) -> None:
        self.blocks[i].to("meta")

    def _assign(self, module: torch.nn.Module, infos: dict[str, TensorInfo]) -> None:
        like = module.state_dict()
        state = {name: info.read().to(like[name].dtype) for name, info in infos.items()}
        result = module.load_state_dict(state, assign=True, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys

    def _fill_buffers(self, root: torch.nn.Module, skip: str | None = None) -> None:
        """Non-persistent buffers (rotary tables, embedding scales) are not in the checkpoint: the model's own
        weight init computes them, as transformers' loader does for a model built on meta."""
        for name, module in root.named_modules():
            if skip and (name == skip or name.startswith(f"{skip}.")):
                continue
            if module._non_persistent_buffers_set:
                module.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    self.model._init_weights(module)


def _under(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(f"{prefix}."))


class _Passed(tuple):
    """What a stand-in block hands on: indexes like a block's tuple output; the next stand-in ignores it."""


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states of a block call: its first argument (as ``watch_residual`` reads a module's input)."""
    return args[0] if args else next(iter(kwargs.values()))


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: hidden}


def run_block(block: torch.nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> Any:
    """The block run on ``hidden`` with the other arguments the model handed it."""
    args, kwargs = _with_hidden(*call, hidden)
    return block(*args, **kwargs)


@contextlib.contextmanager
def _stand_ins(blocks: torch.nn.ModuleList, calls: list[tuple[tuple, dict]], final: Any = None) -> Iterator[None]:
    """Every block's forward records its call (hidden states left out) instead of running; the last one stops
    the pass, or returns ``final`` (the last real block's output) so the model's own code computes the logits."""

    def stand_in(last: bool):
        def forward(*args: Any, **kwargs: Any):
            calls.append(_with_hidden(args, kwargs, None) if calls else (args, kwargs))
            if last and final is None:
                raise _Stop
            return final if last else _Passed((_hidden(args, kwargs),))

        return forward

    for i, block in enumerate(blocks):
        block.forward = stand_in(i == len(blocks) - 1)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def input_of(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, layer: int, **inputs: Any
) -> tuple[torch.Tensor, dict]:
    """The hidden states the model hands block ``layer`` on a call with ``inputs``, and the block's other keyword
    arguments (its mask, a KV cache); that block and the later ones never run."""
    seen: list[tuple[torch.Tensor, dict]] = []

    def stop(_module: torch.nn.Module, args: tuple, kwargs: dict):
        seen.append((_hidden(args, kwargs), kwargs))
        raise _Stop

    handle = blocks[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


@contextlib.contextmanager
def resumed_at(
    blocks: torch.nn.ModuleList, layer: int, hidden: torch.Tensor, then: Callable[[], None] = lambda: None
) -> Iterator[None]:
    """While open, a forward skips the blocks below ``layer`` (stand-ins hand their input on) and block ``layer``
    gets ``hidden`` as its hidden states: what those blocks computed, given once instead of run again. ``then`` runs
    just before block ``layer`` does (after the model has built its masks)."""

    def skip(*args: Any, **kwargs: Any) -> _Passed:
        return _Passed((_hidden(args, kwargs),))

    def resume(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        then()
        return _with_hidden(args, kwargs, hidden)

    for block in blocks[:layer]:
        block.forward = skip
    handle = blocks[layer].register_forward_pre_hook(resume, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for block in blocks[:layer]:
            del block.forward


class HiddenStates:
    """Every batch's hidden states between blocks: tensors in memory within ``budget`` bytes, else slices of
    one memory-mapped float32 file in ``spill_dir`` (refused before the work when that disk lacks the space)."""

    def __init__(self, shapes: list[tuple[int, ...]], budget: int, spill_dir: Path) -> None:
        self.shapes = shapes
        sizes = [math.prod(s) for s in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.nbytes = 4 * self.offsets[-1]
        self.file: Path | None = None
        self._memory: list[torch.Tensor | None] = [None] * len(shapes)
        if self.nbytes <= budget:
            return
        spill_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(spill_dir).free
        if free < self.nbytes:
            raise BakeError(
                f"streaming collection needs {self.nbytes} bytes ({self.nbytes / 2**30:.2f} GiB) of disk "
                f"for the hidden states, which do not fit in memory, but {str(spill_dir)!r} has {free} "
                "bytes free: free space there, set BAKE_CACHE to a larger disk, or lower "
                "batch_tokens/max_tokens or the text count"
            )
        fd, name = tempfile.mkstemp(prefix="hidden-", suffix=".f32", dir=spill_dir)
        os.ftruncate(fd, self.nbytes)  # sparse: disk is used as batches are written
        os.close(fd)
        self.file = Path(name)
        self._map = torch.from_file(name, shared=True, size=self.offsets[-1], dtype=torch.float32)

    def get(self, b: int) -> torch.Tensor:
        if self.file is None:
            return self._memory[b]
        return self._map[self.offsets[b] : self.offsets[b + 1]].clone().reshape(self.shapes[b])

    def put(self, b: int, hidden: torch.Tensor) -> None:
        if hidden.dtype != torch.float32 or tuple(hidden.shape) != self.shapes[b]:
            raise ValueError(
                f"batch {b}: hidden states {hidden.dtype} {list(hidden.shape)}, expected float32 {self.shapes[b]}"
            )
        if self.file is None:
            self._memory[b] = hidden
        else:
            self._map[self.offsets[b] : self.offsets[b + 1]].copy_(hidden.reshape(-1))

    def close(self) -> None:
        self._memory = [None] * len(self.shapes)
        if self.file is not None:
            del self._map
            self.file.unlink(missing_ok=True)


def hidden_budget(block_bytes: int, available: int | None = None) -> int:
    """Bytes of hidden states kept in memory: half of what MemAvailable leaves after one block and HEADROOM."""
    available = mem_available() if available is None else available
    if available is None:
        return 1 << 62
    return max(0, (available - block_bytes - HEADROOM) // 2)


@torch.inference_mode()
def collect_streaming(
    skeleton: Skeleton,
    jobs: list[Job],
    batch_tokens: int = 4096,
    pad_id: int = 0,
    budget: int | None = None,
    kind: type[Moments] = Moments,
) -> list[dict[Point, Moments]]:
    """Each job's moments at its points, as ``collect`` gives them, computed block by block (see the module doc).

    ``budget`` is the bytes of hidden states kept in memory (default: ``hidden_budget``); beyond it they spill
    to disk. Under torch.distributed each rank takes its share of every job's batches and the sums are all-reduced.
    """
    hidden_size = skeleton.model.config.get_text_config().hidden_size
    results = [{p: kind.zeros(hidden_size) for p in job.points} for job in jobs]
    deepest = [max(layer for layer, _ in job.points) for job in jobs]
    work = [(j, group) for j, job in enumerate(jobs) for group in _my_share(batches(job.examples, batch_tokens))]
    shapes = [(len(g), max(len(e.input_ids) for e in g), hidden_size) for _, g in work]
    budget = hidden_budget(skeleton.block_bytes) if budget is None else budget
    store = HiddenStates(shapes, budget, cache_dir() / "spill")
    try:
        calls, masks = [], []
        skeleton.load_outside()
        for b, (_j, group) in enumerate(tqdm(work, desc="embedding", unit="batch", leave=False)):
            ids, attention, counted = padded(group, pad_id)
            seen: list[tuple[tuple, dict]] = []
            with _stand_ins(skeleton.blocks, seen), contextlib.suppress(_Stop):
                skeleton.model(input_ids=ids, attention_mask=attention, use_cache=False)
            store.put(b, _hidden(*seen[0]).clone())
            calls.append([_with_hidden(*call, None) for call in seen])
            masks.append(counted)
        skeleton.free_outside()
        current: dict = {}
        points = sorted({p for job in jobs for p in job.points})
        handles = record_points(skeleton.model, skeleton.family, points, current)
        try:
            for i in tqdm(range(len(skeleton.blocks)), desc=jobs[0].desc, unit="block", leave=False):
                block = skeleton.load_block(i)
                for b, (j, _) in enumerate(work):
                    if i > deepest[j]:
                        continue
                    current["moments"], current["mask"] = results[j], masks[b]
                    out = first_tensor(run_block(block, calls[b][i], store.get(b)))
                    if i < deepest[j]:
                        store.put(b, out)
                skeleton.free_block(i)
        finally:
            for h in handles:
                h.remove()
    finally:
        store.close()
    for moments in results:
        for m in moments.values():
            m.all_reduce()
    return results


def fits_in_memory(needed: int, available: int | None = None) -> bool:
    """Whether ``needed`` bytes (``in_memory_bytes``) fit MemAvailable with the margin and headroom."""
    available = mem_available() if available is None else available
    return available is None or needed * MARGIN + HEADROOM <= available


def collect_sets(
    path: Path, family: Family, jobs: list[Job], batch_tokens: int, pad_id: int, collection: Collection = "auto"
) -> list[dict[Point, Moments]]:
    """Every job's moments, in memory (blocks 0..L built at once) or streamed block by block, as ``collection``
    says; ``auto`` streams when the in-memory path would not fit (``fits_in_memory``)."""
    layers = 1 + max(layer for job in jobs for layer, _ in job.points)
    if collection != "memory":
        model = meta_model(path, layers)
        if collection == "streaming" or not fits_in_memory(in_memory_bytes(model)):
            return collect_streaming(Skeleton(path, family, model), jobs, batch_tokens, pad_id)
    model = load_model(path, dtype=torch.float32, layers=layers)
    return [collect(model, family, job.examples, job.points, batch_tokens, pad_id, desc=job.desc) for job in jobs]


def load_whole(path: Path, what: str) -> torch.nn.Module:
    """The whole model in float32 for a generation loop (sampling a background), refused when it does not fit
    in memory: generation reads every weight for every token, which block-by-block loading cannot make affordable."""
    needed, available = in_memory_bytes(meta_model(path, None)), mem_available()
    if not fits_in_memory(needed, available):
        raise BakeError(
            f"{what}: sampling a background runs the whole model token by token, which needs "
            f"{needed / 2**30:.1f} GiB at float32 in memory ({available / 2**30:.1f} GiB available): give "
            "a corpus background instead ('background: {corpus: {file: texts.txt}}'), e.g. texts sampled "
            "from this model on a larger machine"
        )
    return load_model(path, dtype=torch.float32)


def embed_prompts(skeleton: Skeleton, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Each prompt's (unbatched, unpadded) hidden states entering block 0, and every block's call arguments."""
    skeleton.load_outside()
    hidden, calls = [], []
    for ids in prompts:
        seen: list[tuple[tuple, dict]] = []
        with _stand_ins(skeleton.blocks, seen), contextlib.suppress(_Stop):
            skeleton.model(input_ids=torch.tensor([ids]), use_cache=False)
        hidden.append(_hidden(*seen[0]).clone())
        calls.append([_with_hidden(*call, None) for call in seen])
    skeleton.free_outside()
    return hidden, calls


def prompt_logits(skeleton: Skeleton, prompts: list[list[int]], finals: list[Any]) -> list[torch.Tensor]:
    """Logits from each prompt's last block output, through the model's own final norm and head."""
    skeleton.load_outside(head=True)
    logits = []
    for ids, final in zip(prompts, finals):
        with _stand_ins(skeleton.blocks, [], final=final):
            logits.append(skeleton.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float())
    skeleton.free_outside()
    return logits
