"""Running a GGUF in llama.cpp (through llama-cpp-python) to check a steered file does what the hooks do.

Both engines get the same token ids (from the Hugging Face tokenizer), so a
tokenizer difference can never pass for a steering difference.

Why the comparison is relative: llama.cpp multiplies quantized blocks directly and
quantizes the activations for those products, while transformers runs the
dequantized float32 weights, so the two differ even unsteered (SmolLM2 Q4_1: max
|Δlogit| 1.4, mean 0.19 over the default probe prompts). A correctly baked file stays
within that noise of the hook-steered model (measured: max 0.9x, mean 1.2x the
unsteered gap); the same vectors at 0.8x strength give 3x, a vector at the wrong
layer 12x. So the steered gap must stay within ``GAP_FACTOR`` times the unsteered
gap, and llama.cpp's own change (steered file minus unsteered file) must be at least
half the hooks' change, which a dropped bias (no change at all) fails.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bake.errors import BakeError
from bake.families.hf import family_for
from bake.sources.load import load_model, load_tokenizer, prompt_ids
from bake.vectorfile import VectorSet
from bake.verify import degenerate, residual_norms, steered

GAP_FACTOR = 2.0
INSTALL = "pip install 'bake[llama-cpp]' (compiles llama.cpp, a few minutes)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def cpu_features() -> str:
    """The CPU features this llama.cpp build uses (e.g. "AVX2 FMA ..."): it picks its quantized kernels by them, so
    the last digits of its logits, and the gaps measured from them, belong to one feature set."""
    from llama_cpp import llama_print_system_info  # optional

    return " ".join(name for name, on in re.findall(r"(\w+) = (\d+)", llama_print_system_info().decode()) if on != "0")


def _load(path: Path, n_ctx: int, logits_all: bool = False):
    try:
        from llama_cpp import Llama  # optional
    except ImportError:
        raise BakeError(f"running GGUF files needs llama-cpp-python: {INSTALL}") from None
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            verbose=False,
            n_threads=torch.get_num_threads(),
            n_gpu_layers=0,
        )
    except ValueError as e:  # llama-cpp-python reports a loader refusal as "Failed to load model from file"
        raise BakeError(
            f"llama.cpp refused to load {str(path)!r} ({e}): the file is not one this llama.cpp can run"
        ) from None


def logits(path: Path, ids: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's logits at every position of each token sequence."""
    llm = _load(path, max(len(x) for x in ids) + 8, logits_all=True)
    out = []
    for x in ids:
        llm.reset()
        llm.eval(x)
        out.append(np.array(llm.scores[: len(x)], dtype=np.float32))
    llm.close()
    return out


def greedy(path: Path, ids: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations (at most ``tokens``, stopping at end of sequence)."""
    llm = _load(path, max(len(x) for x in ids) + tokens + 8)
    out = []
    for x in ids:
        new: list[int] = []
        for token in llm.generate(x, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(new) == tokens:
                break
            new.append(token)
        out.append(new)
    llm.close()
    return out


def _gaps(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """Max and mean |a - b| over every position and vocabulary entry."""
    diffs = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
    return float(diffs.max()), float(diffs.mean())


def _top1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def compare(
    source: Path, steered_file: Path, dequantized: Path, vectors: VectorSet, prompts: list[str]
) -> dict[str, Any]:
    """The steered GGUF in llama.cpp vs the dequantized base steered by hooks in transformers, at every prompt
    position."""
    tokenizer = load_tokenizer(dequantized)
    ids = [prompt_ids(tokenizer, p, chat=False) for p in prompts]
    model = load_model(dequantized, dtype=torch.float32)
    family = family_for(model.config)
    residual = residual_norms(model, family, ids, sorted(vectors.vectors))
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([x])).logits[0].float().numpy() for x in ids]
        with steered(model, family, vectors):
            hooked = [model(input_ids=torch.tensor([x])).logits[0].float().numpy() for x in ids]
    del model
    base, baked = logits(source, ids), logits(steered_file, ids)
    (base_max, base_mean), (max_gap, mean_gap) = _gaps(base, plain), _gaps(baked, hooked)
    change = np.concatenate([(s - b).ravel() for s, b in zip(baked, base)])
    hook_change = np.concatenate([(h - p).ravel() for h, p in zip(hooked, plain)])
    report = {
        "engine": f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}",
        "prompts": len(prompts),
        "positions": sum(len(x) for x in ids),
        "max_gap": max_gap,
        "mean_gap": mean_gap,
        "unsteered_max_gap": base_max,
        "unsteered_mean_gap": base_mean,
        "gap_factor": GAP_FACTOR,
        "steering_effect": float(np.abs(change).max()),
        "hook_effect": float(np.abs(hook_change).max()),
        "effect_relative_error": float(
            np.linalg.norm(change - hook_change) / max(float(np.linalg.norm(hook_change)), 1e-30)
        ),
        "top1_agreement": _top1(baked, hooked),
        "unsteered_top1_agreement": _top1(base, plain),
        "degenerate": degenerate([torch.from_numpy(x) for x in hooked + baked], vectors, residual),
    }
    report["passed"] = bool(
        max_gap <= GAP_FACTOR * base_max
        and mean_gap <= GAP_FACTOR * base_mean
        and report["steering_effect"] >= 0.5 * report["hook_effect"]
        and not report["degenerate"]
    )
    return report


def describe(report: dict[str, Any]) -> str:
    dead = "; ".join(report.get("degenerate", []))  # absent from the reports of bakes before the check
    return (
        (f"{dead}; " if dead else "")
        + f"llama.cpp vs hook-steered transformers over {report['positions']} positions: |Δlogit| max "
        f"{report['max_gap']:.3g}, mean {report['mean_gap']:.3g} (unsteered file: {report['unsteered_max_gap']:.3g}, "
        f"{report['unsteered_mean_gap']:.3g}; allowed {report['gap_factor']:g}x); steering changes logits by up to "
        f"{report['steering_effect']:.3g} (hooks {report['hook_effect']:.3g}, relative error "
        f"{report['effect_relative_error']:.2f}); top-1 agreement {report['top1_agreement']:.1%} (unsteered "
        f"{report['unsteered_top1_agreement']:.1%})"
    )
