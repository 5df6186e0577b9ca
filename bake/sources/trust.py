"""The remote-code trust check: bake runs a checkpoint's code only if it is exactly the constant-bias module
bake writes (``bake.formats.hf.remote``), and never measures or bakes on a checkpoint that already carries one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bake.errors import BakeError

TEMPLATE = Path(__file__).parents[1] / "remote_code" / "modeling_bake.py"
MODELING_FILE = "modeling_bake.py"
CONFIG_KEY = "bake_steering"
CLASS_PREFIX = "BakeSteered"
# sha256 of earlier releases of the module file, same format (bake-steering/2), that bake still runs: a checkpoint
# baked before a change to the module keeps loading in bake's own commands, without a re-bake.
EARLIER_CODE = {
    "9e5bddae63d0fc3148af1d543d79f9cc2f5cbf8dac6b31e5fb24ae55b9cbc141": "before it took its stock class's "
    "checkpoint renames (which vLLM needs for Gemma 3's wrapper and Mixtral)",
}


def auto_map(base_architecture: str, base_model: str) -> dict[str, str]:
    """config.json's ``auto_map`` for the constant-bias module: the causal LM transformers loads, and the base
    model vLLM's Transformers backend builds."""
    stem = Path(MODELING_FILE).stem
    return {
        "AutoModelForCausalLM": f"{stem}.{CLASS_PREFIX}{base_architecture}",
        "AutoModel": f"{stem}.{CLASS_PREFIX}{base_model}",
    }


def code_sha256() -> str:
    return hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()


def refuse_steered_source(config: dict[str, Any], where: str) -> None:
    """A checkpoint that already carries a constant-bias module is not a base model to measure or bake."""
    if CONFIG_KEY in config:
        raise BakeError(
            f"{where} already carries steering in a bake constant-bias module (config.json {CONFIG_KEY}): "
            "measure and bake on the original base model instead"
        )


def is_steered(path: Path) -> bool:
    """Whether the checkpoint folder at ``path`` carries a bake constant-bias module."""
    try:
        return CONFIG_KEY in json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def check_code(path: Path) -> None:
    """Refuse to run the folder's remote code unless it is exactly the file this bake writes (or an earlier
    release of it, ``EARLIER_CODE``).

    bake then loads it with ``trust_remote_code=True`` knowing it executes only its own code.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    written = config.get("auto_map")
    spec = config.get(CONFIG_KEY) or {}
    expected = auto_map(str(spec.get("base_architecture")), str(spec.get("base_model")))
    code = path / MODELING_FILE
    known = {code_sha256(), *EARLIER_CODE}
    if written != expected or not code.is_file() or hashlib.sha256(code.read_bytes()).hexdigest() not in known:
        raise BakeError(
            f"{str(path)!r} carries a bake constant-bias module, but its {MODELING_FILE} or auto_map is not the one "
            "this version of bake writes: review the code, then load it yourself with trust_remote_code=True (or "
            "re-bake it)"
        )
