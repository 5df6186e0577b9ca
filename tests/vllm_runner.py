"""Greedy decoding in vLLM for tests/test_vllm.py, run by the vLLM environment's python (not the suite's).

Reads a JSON job (argument 1): {"tokens": N, "prompts": [[ids...], ...], "models": [{"path": ...,
"trust_remote_code": bool, "engine": {more LLM arguments}}, ...]}. Loads the models in turn in this one process and
prints one JSON line per model: {"path": ..., "architecture": <the class vLLM ran>, "tokens": [[ids...] per prompt]}
or {"path": ..., "error": "<type>: <message> (in <function>, <file>)"} when vLLM refuses it (the test reports that),
each with "seconds", the wall time it took. Token ids in, token ids out (a multimodal wrapper's engine loads its
tokenizer all the same: vLLM builds the wrapper's processor from it).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _run(model: dict, prompts: list[list[int]], tokens: int) -> dict:
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt

    args = dict(
        model=model["path"],
        dtype="float32",
        max_model_len=128,
        enforce_eager=True,
        skip_tokenizer_init=True,
        trust_remote_code=model.get("trust_remote_code", False),
        seed=0,
        max_num_seqs=len(prompts),
    )
    llm = LLM(**{**args, **model.get("engine", {})})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        config = llm.llm_engine.model_config
        architecture = ModelRegistry.resolve_model_cls(config.architectures, model_config=config)[0].__name__
        return {
            "path": model["path"],
            "architecture": architecture,
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        }
    finally:
        del llm
        gc.collect()


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    for model in job["models"]:
        start = time.monotonic()
        try:
            result = _run(model, job["prompts"], job["tokens"])
        except Exception as e:  # noqa: BLE001 -- reported per model: one refusal must not hide the others' results
            traceback.print_exc()
            frame = traceback.extract_tb(e.__traceback__)[-1]  # where vLLM stopped, for the test's expected failures
            result = {
                "path": model["path"],
                "error": f"{type(e).__name__}: {e} (in {frame.name}, {Path(frame.filename).name})",
            }
        result["seconds"] = round(time.monotonic() - start, 1)  # engine start, decoding and teardown
        print("BAKE-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine runs in this one
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little
    main()
