"""Loading and running base models with stock transformers (no remote code but bake's own, checked first).

``layers`` builds only blocks 0..L so collecting at block L costs in proportion to (L+1)/N;
generation is greedy and one prompt at a time, so nothing depends on batch layout.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bake.checkpoint import require_safetensors
from bake.errors import BakeError
from bake.families.hf import Family, family_for, wrapper_for
from bake.sources import trust

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _auto_config(path: Path) -> Any:
    """transformers' config of a model folder, or one line saying why it cannot be read: a fresh copy each call
    (callers cut it), parsed once per folder and content of its config.json (one ``bake run`` asked 16 times)."""
    try:
        text = (Path(path) / "config.json").read_bytes()
    except OSError:
        text = None  # transformers says why
    return copy.deepcopy(_read_config(Path(path), text))


@functools.lru_cache(maxsize=32)
def _read_config(path: Path, _text: bytes | None) -> Any:
    import transformers  # startup
    from transformers import AutoConfig  # startup

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, TypeError) as e:
        try:
            model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if isinstance(model_type, str) and model_type not in transformers.CONFIG_MAPPING:
            why = f"its model_type {model_type!r} is unknown to transformers {transformers.__version__}"
        else:
            first = str(e).splitlines()[0] if str(e) else ""
            why = f"transformers cannot read its config.json ({e.__class__.__name__}: {first})"
        raise BakeError(f"{str(path)!r}: {why}: upgrade transformers or fix config.json") from None


def text_config(path: Path) -> Any:
    """The transformers config of the language model (normalises GPT-2's n_embd etc.): in a multimodal wrapper
    (``bake.families.hf.WRAPPERS``) its text config; a wrapper bake has no entry for is refused here, before any
    work."""
    config = _auto_config(path)
    try:
        wrapper_for(config)
    except BakeError as e:
        raise BakeError(f"{str(path)!r}: {e}") from None
    return config.get_text_config()


def family_at(path: Path) -> Family:
    """The family entry of the model folder at ``path`` (a wrapper's language model as it sits in the wrapper)."""
    text_config(path)  # refuses an unknown wrapper naming the folder
    return family_for(_auto_config(path))


def truncated_config(path: Path, layers: int | None = None) -> Any:
    """The model's transformers config, cut to blocks 0..layers-1 when ``layers`` is given (so a meta skeleton
    is cut the same way as a loaded model)."""
    config = _auto_config(path)
    if layers is not None:
        text = config.get_text_config()
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
    return config


def auto_class(config: Any) -> Any:
    """The transformers auto class that builds this config's model: AutoModelForCausalLM, or a wrapper's own."""
    import transformers  # startup

    wrapper = wrapper_for(config)
    return getattr(transformers, wrapper.auto_class if wrapper is not None else "AutoModelForCausalLM")


def load_model(path: Path, dtype: torch.dtype | None = None, layers: int | None = None, **kwargs: Any) -> Any:
    """Stock ``AutoModelForCausalLM.from_pretrained`` (no remote code), in eval mode; a multimodal wrapper with
    its entry's auto class (``bake.families.hf.Wrapper``), vision tower and all.

    The one exception: a checkpoint bake wrote with a constant-bias module (``bake.formats.hf.remote``)
    loads with ``trust_remote_code=True``, after checking that its modeling file is exactly
    the one this bake writes (so only bake's own code runs), never silently without it.
    ``layers`` builds only blocks 0..layers-1 (their weights alone are loaded), so
    collecting at block L costs memory and time in proportion to (L+1)/N.
    On a GPU machine the model keeps its own dtype and is spread with device_map="auto".
    """
    require_safetensors(path)
    kwargs["use_safetensors"] = True
    config = truncated_config(path, layers)
    auto = auto_class(config)
    if torch.cuda.is_available():
        kwargs.setdefault("device_map", "auto")
    if "trust_remote_code" not in kwargs and trust.is_steered(path):
        trust.check_code(path)
        kwargs["trust_remote_code"] = True
    if layers is None:
        return auto.from_pretrained(path, config=config, dtype=dtype or "auto", **kwargs).eval()
    with _held_load_report() as report:
        model, info = auto.from_pretrained(
            path, config=config, dtype=dtype or "auto", output_loading_info=True, **kwargs
        )
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


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # startup

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint is stored in, from its config (float32 when unstated)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt, as a user turn of the chat template when ``chat`` and the model has one."""
    if chat and tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer(prompt).input_ids


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    chat: bool = False,
) -> list[str]:
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
