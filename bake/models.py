"""Where base models come from, and loading/running them with stock transformers.

Every source is turned into a local Hugging Face folder of safetensors first
(a Hub snapshot, a local folder as is, a GGUF file dequantized once into a
cache), so folding, verification and manifests all work on one kind of input.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from bake import remote
from bake.errors import BakeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PKG = re.compile(r"^pkg:(?P<package>[A-Za-z_][\w]*)/(?P<file>.+)$")


def cache_dir() -> Path:
    """bake's cache (converted GGUF models, sampled backgrounds); ``BAKE_CACHE`` overrides."""
    return Path(os.environ.get("BAKE_CACHE") or Path.home() / ".cache" / "bake")


@dataclass
class ModelSource:
    """A base model resolved to a local HF folder, with what identifies it for provenance."""

    spec: str
    path: Path
    identity: dict[str, Any] = field(default_factory=dict)
    gguf_license: str | None = None

    @property
    def license(self) -> str | None:
        """The base model's licence: its GGUF metadata, else its model card's front-matter (for the baked card)."""
        if self.gguf_license or not (self.path / "README.md").is_file():
            return self.gguf_license
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(self.path / "README.md").data.license
        except (ValueError, OSError):  # a README without valid front-matter
            return None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    @property
    def key(self) -> str:
        """A short stable hash of the identity, for cache keys."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_file(spec: str) -> Path:
    """``pkg:PACKAGE/FILE`` → the file inside an installed package, without importing it."""
    m = _PKG.match(spec)
    assert m, spec
    found = importlib.util.find_spec(m["package"])
    if found is None or not found.submodule_search_locations:
        raise BakeError(f"package {m['package']!r} is not installed: pip install {m['package'].replace('_', '-')}")
    path = Path(list(found.submodule_search_locations)[0]) / m["file"]
    if not path.is_file():
        raise BakeError(f"{spec}: no file {m['file']!r} in package {m['package']!r}: check the file name")
    return path


def resolve_model(spec: str, revision: str | None = None, base_dir: Path | None = None) -> ModelSource:
    """Turn a model spec (folder, ``.gguf`` file, ``pkg:PACKAGE/FILE``, Hub id) into a local folder."""
    if _PKG.match(spec):
        return _from_gguf(spec, package_file(spec))
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BakeError(f"GGUF file {spec!r} not found: check the path")
        return _from_gguf(spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BakeError(f"{spec!r} is a folder without config.json: give a Hugging Face model folder")
        config = (path / "config.json").read_bytes()
        return ModelSource(
            spec, path.resolve(), {"kind": "local", "path": str(path.resolve()), "config_sha256": hashlib.sha256(config).hexdigest()}
        )
    if path.exists() or not _HUB_ID.match(spec):
        raise BakeError(
            f"model {spec!r} not found: give a local Hugging Face folder, a .gguf file, pkg:PACKAGE/FILE or a Hub id"
        )
    return _from_hub(spec, revision)


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from bake.hub import download

    # bake/*: a baked base keeps its own vectors and undo data, which a bake on top of it carries on.
    path = download(repo_id, revision, ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "README.md", "bake/*"])
    return ModelSource(repo_id, path, {"kind": "hub", "repo_id": repo_id, "commit": path.name})


def _from_gguf(spec: str, gguf: Path) -> ModelSource:
    """Dequantize a GGUF file once into a cached safetensors folder (float32, as transformers reads it)."""
    digest = sha256_file(gguf)
    identity = {"kind": "gguf", "file": gguf.name, "sha256": digest}
    target = cache_dir() / "gguf" / digest[:24]
    if (target / "config.json").is_file():
        return ModelSource(spec, target, identity, _gguf_license(gguf))
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise BakeError(f"reading GGUF files needs the {needed!r} package: pip install 'bake[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.config.__dict__.pop("_is_quantized", None)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelSource(spec, target, identity, _gguf_license(gguf))


def _gguf_license(gguf: Path) -> str | None:
    if importlib.util.find_spec("gguf") is None:  # a cached dequantized copy works without it
        return None
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("general.license")
    return field.contents() if field is not None else None


def text_config(path: Path):
    """The transformers config of the language model part (normalises GPT-2's n_embd etc.)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).get_text_config()
    except (ValueError, KeyError, OSError) as e:
        raise BakeError(f"{str(path)!r}: transformers cannot read its config.json ({e}): upgrade transformers or fix the file") from None


def truncated_config(path: Path, layers: int | None = None):
    """The model's transformers config, cut to blocks 0..layers-1 when ``layers`` is given."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if layers is not None:
        text = config.get_text_config()
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
    return config


def load_model(path: Path, dtype: torch.dtype | None = None, layers: int | None = None, **kwargs: Any):
    """Stock ``AutoModelForCausalLM.from_pretrained`` (no remote code), in eval mode.

    The one exception: a checkpoint bake wrote with a constant-bias module (``bake.remote``)
    loads with ``trust_remote_code=True``, after checking that its modeling file is exactly
    the one this bake writes (so only bake's own code runs), never silently without it.
    ``layers`` builds only blocks 0..layers-1 (their weights alone are loaded), so
    collecting at block L costs memory and time in proportion to (L+1)/N.
    On a GPU machine the model keeps its own dtype and is spread with device_map="auto".
    """
    from transformers import AutoModelForCausalLM

    config = truncated_config(path, layers)
    if torch.cuda.is_available():
        kwargs.setdefault("device_map", "auto")
    if "trust_remote_code" not in kwargs and remote.is_steered(path):
        remote.check_code(path)
        kwargs["trust_remote_code"] = True
    if layers is None:
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto", **kwargs).eval()
    with _held_load_report() as report:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto", output_loading_info=True, **kwargs)
        if not (info["missing_keys"] or info["mismatched_keys"] or info["error_msgs"]):
            report.records.clear()  # only the later blocks' weights were left out, as intended
    return model.eval()


class _HeldRecords(logging.Filter):
    """Holds back transformers' loading report: a truncated model leaves the later blocks' weights
    "UNEXPECTED" on purpose, and a page-long warning about that would hide real problems."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _held_load_report() -> Iterator[_HeldRecords]:
    """Records of transformers' model-loading logger are held back and emitted at the end unless cleared."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldRecords()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint is stored in, from its config (float32 when unstated)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt, as a user turn of the chat template when ``chat`` and the model has one."""
    if chat and tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer(prompt).input_ids


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding, so nothing depends on batch layout)."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs
