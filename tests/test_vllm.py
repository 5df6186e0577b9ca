"""Every family and site that bakes exactly, run in stock vLLM: greedy token ids equal transformers' steered
model's, and differ from the unsteered base's (so a dropped bias fails).

vLLM pins its own transformers, so it runs in a second environment (tests/setup_vllm.sh, at $BAKE_VLLM_VENV)
through tests/vllm_runner.py: one process loads every baked model in turn. Without that environment every test
here is skipped with the reason. The table's vLLM column (bake/families/hf.py) must say what ran: "tested
(vLLM <version>)" for each family run here, and "Transformers backend" exactly where vLLM chose that class.

Families with a site no stock bias can carry are also baked with allow_remote_code (the constant-bias module,
bake/remote_code/modeling_bake.py) at every site they have, and run with trust_remote_code=True in both stacks.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_tokenizer, save_tiny, tiny_config
from test_architectures import EXACT, PROBES
from transformers import AutoModelForCausalLM

import bake
from bake.families.hf import FAMILIES, family_for
from bake.recipe import VerifySpec
from bake.vectorfile import VectorSet

pytestmark = pytest.mark.vllm

VLLM_VERSION = "0.32.0"
VENV = Path(os.environ.get("BAKE_VLLM_VENV", Path.home() / ".cache" / "bake" / "vllm-venv"))
RUNNER = Path(__file__).parent / "vllm_runner.py"
TOKENS = 8
TESTED = f"tested (vLLM {VLLM_VERSION})"
# vLLM's CPU attention needs head_dim >= 32: the tiny configs widened to hidden 128 over 4 heads.
_WIDE = {
    "n_embd": 128,
    "hidden_size": 128,
    "word_embed_proj_dim": 128,
    "intermediate_size": 256,
    "ffn_dim": 256,
    "head_dim": 32,
}


def wide_config(model_type: str, **overrides):
    return tiny_config(model_type, **{k: v for k, v in _WIDE.items() if k in TINY[model_type]}, **overrides)


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


def _groups() -> dict[str, tuple[str, dict, list[str], bool]]:
    """The exact cases of test_architectures, one checkpoint per configuration carrying all its sites; then one
    checkpoint per family with a site only the constant-bias module carries (the last field: remote code)."""
    groups: dict[str, tuple[str, dict, list[str], bool]] = {}
    for model_type, overrides, site, _ in EXACT:
        if not family_for(tiny_config(model_type, **overrides)).vllm.startswith(TESTED):
            continue  # the column says it is read from source or not run here (MoE families: by hand once at most)
        key = "-".join([model_type, *(f"{k}={v}" for k, v in overrides.items())])
        groups.setdefault(key, (model_type, overrides, [], False))[2].append(site)
    for family in FAMILIES:
        if family.vllm.startswith(TESTED) and any(slot.bias is None for slot in family.sites.values()):
            groups[f"{family.model_types[0]}-allow_remote_code"] = (family.model_types[0], {}, list(family.sites), True)
    return groups


GROUPS = _groups()


@pytest.fixture(scope="module")
def runs(vllm_python, tmp_path_factory, one_thread) -> dict[str, dict]:
    """Bake every group, run them all in one vLLM process; per group: transformers' tokens and vLLM's result."""
    root = tmp_path_factory.mktemp("vllm")
    tok = make_tokenizer()
    prompts = [tok(p).input_ids for p in PROBES]
    cases: dict[str, dict] = {}
    for key, (model_type, overrides, sites, remote) in GROUPS.items():
        config = wide_config(model_type, **overrides)
        src = save_tiny(root / key / "src", config)
        base = AutoModelForCausalLM.from_pretrained(src).eval()
        plain = [greedy(base, p) for p in prompts]
        with torch.no_grad():  # vectors twice the residual stream's largest norm
            hidden = base(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
        norm = max(float(h.norm(dim=-1).mean()) for h in hidden)
        out = root / key / "baked"
        for seed in range(3, 11):  # the first of a few fixed directions that changes greedy tokens (the test must
            g = torch.Generator().manual_seed(seed)  # be able to fail; tiny random GPT-NeoX ignores most)
            vectors = VectorSet(
                {(layer, site): 2 * norm * _unit(config.hidden_size, g) for site in sites for layer in (1, 3)}
            )
            verify = VerifySpec(prompts=PROBES[:1], tokens=2)
            bake.fold(str(src), vectors, out, force=True, verify=verify, allow_remote_code=remote)
            # stock transformers, as the user loads it
            baked = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
            steered = [greedy(baked, p) for p in prompts]
            if steered != plain:
                break
        cases[key] = {
            "family": family_for(config).name,
            "path": str(out),
            "steered": steered,
            "base": plain,
            "remote": remote,
        }
    job = root / "job.json"
    models = [{"path": c["path"], "trust_remote_code": c["remote"]} for c in cases.values()]
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


@pytest.mark.parametrize("key", GROUPS)
def test_vllm_greedy_equals_transformers_steered(runs, key):
    run = runs[key]
    got = run["vllm"]
    assert "error" not in got, f"vLLM refused the baked {run['family']} checkpoint ({GROUPS[key][2]}): {got['error']}"
    assert run["steered"] != run["base"], "the steering does not change greedy tokens: the test could not fail"
    assert got["tokens"] == run["steered"], (
        f"vLLM ({got['architecture']}) does not apply the steering at {GROUPS[key][2]}: {got['tokens']} vs "
        f"transformers {run['steered']}" + (" (= the unsteered base's)" if got["tokens"] == run["base"] else "")
    )


def test_table_says_what_vllm_ran(runs):
    """The vLLM column claims "tested" exactly for the families run here, naming the Transformers backend
    exactly where vLLM chose it, and trust_remote_code exactly where the constant-bias module ran."""
    ran: dict[str, set[str]] = {}
    remote = {run["family"] for run in runs.values() if run["remote"]}
    for run in runs.values():
        ran.setdefault(run["family"], set()).add(run["vllm"].get("architecture", "error"))
    for family in FAMILIES:
        if family.name not in ran:
            assert TESTED not in family.vllm, f"{family.name}: says {family.vllm!r} but no test runs it in vLLM"
            continue
        assert family.vllm.startswith(TESTED), f"{family.name} runs in vLLM here: its column says {family.vllm!r}"
        backend = ran[family.name] == {"TransformersForCausalLM"}
        assert len(ran[family.name]) == 1, (family.name, ran[family.name])
        assert backend == ("Transformers backend" in family.vllm), (family.name, ran[family.name], family.vllm)
        assert (family.name in remote) == ("trust_remote_code" in family.vllm), (family.name, family.vllm)
