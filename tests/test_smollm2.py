"""The real bundled model: the quickstart recipe bakes, verifies, loads in a stock pipeline and is more cheerful.

The bake is conftest's ``quickstart``: the README's own quickstart command, run once per session.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Held-out prompts: none of them is in the recipe or its data.
PROMPTS = [
    "How do I file my income tax return?",
    "I have a dentist appointment tomorrow. Any advice?",
    "Explain what car insurance covers.",
    "The bus was late again this morning.",
    "How do I write a polite email to my bank?",
    "My flight got delayed by three hours.",
]
# An independent word list (not derived from the training texts) of cheerful vocabulary.
CHEERFUL = set(
    "happy happiness joy joyful wonderful love lovely great fantastic amazing delightful delight glad excited "
    "exciting fun sunny sunshine smile smiles smiling cheerful bright awesome beautiful thrilled hooray yay "
    "marvelous marvellous brilliant fabulous terrific enjoy enjoying perfect laughter laugh best".split()
)


def cheer_rate(texts: list[str]) -> float:
    words = [w for t in texts for w in re.findall(r"[a-z']+", t.lower())]
    return sum(w in CHEERFUL for w in words) / max(1, len(words))


def test_quickstart_verifies_on_the_real_model(quickstart):
    manifest = json.loads((quickstart / "bake.json").read_text())
    ver = manifest["verification"]
    assert ver["dtype"] == "float32"
    assert ver["passed"] and ver["greedy_identical"]
    assert ver["max_abs_logit_diff"] < 1e-3 < ver["steering_effect"]
    (entry,) = manifest["vectors"]["entries"]
    assert entry["counts"]["target"]["texts"] >= 100
    config = json.loads((quickstart / "config.json").read_text())
    assert config["model_type"] == "llama" and config["mlp_bias"] is True


def test_stock_pipeline_generates_more_cheerful_text(quickstart, smollm2):
    from transformers import pipeline

    def continuations(model_path: Path) -> list[str]:
        pipe = pipeline("text-generation", model=str(model_path))
        chats = [[{"role": "user", "content": p}] for p in PROMPTS]
        return [out[0]["generated_text"][-1]["content"] for out in pipe(chats, max_new_tokens=40, do_sample=False)]

    base, steered = continuations(smollm2), continuations(quickstart)
    assert steered != base
    assert cheer_rate(steered) > 2 * cheer_rate(base) and cheer_rate(steered) - cheer_rate(base) > 0.03, (base, steered)


def test_card_carries_the_base_licence_the_data_hashes_and_the_recipe(quickstart):
    """The licence comes from the GGUF's metadata (general.license); every text set is listed with its hash."""
    from huggingface_hub import ModelCard

    manifest = json.loads((quickstart / "bake.json").read_text())
    card = ModelCard.load(quickstart / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (entry,) = manifest["vectors"]["entries"]
    assert entry["data"].keys() == {"target", "background"}
    for role, info in entry["data"].items():
        assert f"| {entry['name']} | {role} |" in card.text and info["sha256"][:16] in card.text
    assert manifest["recipe"]["text"].strip() in card.text
