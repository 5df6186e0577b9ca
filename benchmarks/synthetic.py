"""Random-weight Llama checkpoints for benchmarks, written shard by shard.

Tensor names and shapes come from ``LlamaForCausalLM`` built on the meta device
(no memory), so the files load with stock transformers; only one shard's tensors
are ever in memory. A finished checkpoint is cached by its spec and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

# Specs: Llama-3.2-1B-like blocks with SmolLM2's vocabulary (so SmolLM2 token ids are valid),
# and a deeper one with Llama 3's vocabulary for the multi-GB fold checkpoint.
SPECS: dict[str, dict] = {
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=49152,
        max_shard_mb=1024,
    ),
    "llama-1b-quick": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=49152,
        max_shard_mb=64,
    ),
    "llama-3.5gb": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=20,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_shard_mb=1024,
    ),
    "llama-3.5gb-quick": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_shard_mb=64,
    ),
    # 8B-like blocks (Llama 3 8B's widths), 64 of them: 28 GB in bf16, more than this machine's memory.
    "llama-8b-blocks": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=64,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=49152,
        max_shard_mb=4096,
    ),
    "llama-8b-blocks-quick": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=49152,
        max_shard_mb=256,
    ),
}


def _config(spec: dict):
    from transformers import LlamaConfig

    arch = {k: v for k, v in spec.items() if k != "max_shard_mb"}
    return LlamaConfig(
        **arch,
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def _shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` bf16 bytes (as save_pretrained does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def checkpoint(name: str, cache: Path) -> Path:
    """The folder of synthetic checkpoint ``name`` (written on first use, then reused)."""
    spec = SPECS[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    target = cache / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    config = _config(spec)
    shapes = _shapes(config)
    shards = _plan_shards(shapes, spec["max_shard_mb"] << 20)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        gen = torch.Generator().manual_seed(0)
        weight_map, total = {}, 0
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for n in names:
                if n.endswith("norm.weight"):
                    tensors[n] = torch.ones(shapes[n], dtype=torch.bfloat16)
                else:
                    tensors[n] = (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
                total += tensors[n].numel() * 2
                weight_map[n] = file
            save_file(tensors, staging / file, metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
