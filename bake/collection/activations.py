"""Collect mean residual-stream activations without storing per-token activations.

One batched forward pass records every requested (layer, site) as float64
running sums over counted positions, then stops after the deepest requested
block: later blocks and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bake.collection.texts import Example
from bake.families.hf import Family, Site


@dataclass
class Moments:
    """Running sums over counted positions: enough for a mean and a mean norm."""

    total: torch.Tensor
    count: int = 0
    norm_total: float = 0.0

    @classmethod
    def zeros(cls, hidden: int) -> Moments:
        return cls(torch.zeros(hidden, dtype=torch.float64))

    def add(self, acts: torch.Tensor) -> None:
        """Add a [n, hidden] block of activations (any dtype; summed in float64)."""
        acts = acts.to(torch.float64)
        self.total += acts.sum(0)
        self.count += acts.shape[0]
        self.norm_total += float(acts.norm(dim=-1).sum())

    def all_reduce(self) -> None:
        """Sum over all ranks of a torch.distributed job (a no-op in a single process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        packed = torch.cat([self.total, torch.tensor([float(self.count), self.norm_total], dtype=torch.float64)])
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = packed.to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        self.total, self.count, self.norm_total = packed[:-2], int(packed[-2]), float(packed[-1])

    def merge(self, other: Moments) -> None:
        self.total += other.total
        self.count += other.count
        self.norm_total += other.norm_total

    @property
    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("mean of zero positions")
        return self.total / self.count

    @property
    def mean_norm(self) -> float:
        return self.norm_total / self.count if self.count else 0.0


class _Stop(Exception):
    """Raised by the last hook to end the forward pass after the deepest block needed."""


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


def block(model: torch.nn.Module, family: Family, layer: int) -> torch.nn.Module:
    return module_at(model, family.blocks)[layer]


def hook_module(model: torch.nn.Module, family: Family, layer: int, site: Site) -> torch.nn.Module:
    """The module whose output (first element) joins the residual at (layer, site): steering adds here."""
    return module_at(block(model, family, layer), family.slot(site, model.config).hook)


def first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def watch_residual(
    model: torch.nn.Module, family: Family, layer: int, site: Site, fn: Callable[[torch.Tensor], None]
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(residual)`` with the residual stream at (layer, site) on every forward pass."""
    slot = family.slot(site, model.config)
    if slot.read:

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            fn(args[0] if args else next(iter(kwargs.values())))

        return module_at(block(model, family, layer), slot.read).register_forward_pre_hook(pre_hook, with_kwargs=True)
    return hook_module(model, family, layer, site).register_forward_hook(lambda _m, _i, out: fn(first_tensor(out)))


def record_points(
    model: torch.nn.Module, family: Family, points: list[tuple[int, Site]], current: dict
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks adding the residual at each point, at the counted positions ``current["mask"]``, into
    ``current["moments"][point]`` (a pass that does not measure a point has no entry for it). Activations
    flattened to [batch * width, hidden] (OPT's decoder layer does so before its final LayerNorm) are unflattened."""

    def recorder(point: tuple[int, Site]):
        def record(acts: torch.Tensor) -> None:
            if point in current["moments"]:
                mask = current["mask"]
                current["moments"][point].add(acts.reshape(*mask.shape, acts.shape[-1])[mask])

        return record

    return [watch_residual(model, family, layer, site, recorder((layer, site))) for layer, site in points]


def batches(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Group examples, sorted by length to cut padding, into batches of at most ``batch_tokens``
    padded tokens (a single longer example forms its own batch)."""
    order = sorted(examples, key=lambda e: len(e.input_ids))
    groups: list[list[Example]] = []
    current: list[Example] = []
    for ex in order:
        width = max([len(ex.input_ids)] + [len(e.input_ids) for e in current])
        if current and width * (len(current) + 1) > batch_tokens:
            groups.append(current)
            current = []
        current.append(ex)
    if current:
        groups.append(current)
    return groups


def padded(group: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch right-padded: input ids, attention mask, and the mask of counted positions
    (public so benchmarks can feed another collection method exactly the same tensors)."""
    width = max(len(e.input_ids) for e in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(group), width), dtype=torch.long)
    counted = torch.zeros((len(group), width), dtype=torch.bool)
    for row, ex in enumerate(group):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        attention[row, :n] = 1
        counted[row, :n] = torch.tensor(ex.counted)
    return ids, attention, counted


def _my_share(groups: list) -> list:
    """This rank's batches of a torch.distributed job (all of them in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return groups[torch.distributed.get_rank() :: torch.distributed.get_world_size()]
    return groups


@torch.inference_mode()
def collect(
    model: torch.nn.Module,
    family: Family,
    examples: list[Example],
    points: list[tuple[int, Site]],
    batch_tokens: int = 4096,
    pad_id: int = 0,
    desc: str = "collecting",
    kind: type[Moments] = Moments,
) -> dict[tuple[int, Site], Moments]:
    """Mean activations at each (layer, site) over the counted positions of ``examples``.

    Right padding with an attention mask; padded and uncounted positions are
    dropped before summing. The pass stops after the deepest requested block.
    Under torch.distributed (torchrun, accelerate launch) each rank takes every
    world-size-th batch and the sums are all-reduced: every rank gets the totals.
    ``kind`` is the accumulator (a ``Moments`` subclass may keep more, e.g. second moments).
    """
    hidden = model.config.get_text_config().hidden_size
    moments = {p: kind.zeros(hidden) for p in points}
    deepest = max(layer for layer, _ in points)
    current: dict = {"moments": moments}
    device = model.get_input_embeddings().weight.device

    def stopper(_module: torch.nn.Module, _inputs: tuple[Any, ...], _output: Any):
        raise _Stop

    handles = record_points(model, family, points, current)
    handles.append(block(model, family, deepest).register_forward_hook(stopper))
    try:
        for group in tqdm(_my_share(batches(examples, batch_tokens)), desc=desc, unit="batch", leave=False):
            ids, attention, counted = padded(group, pad_id)
            current["mask"] = counted.to(device)
            try:
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for m in moments.values():
        m.all_reduce()
    return moments
