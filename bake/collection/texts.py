"""Text sources, and turning texts into token sequences with the positions that count.

An ``Example`` carries its token ids and a mask of the positions whose
activations enter a mean. The first position is never counted (BOS or not, it
is an attention sink whose residual norm dwarfs every other), nor is any
special token or, in chat mode, anything outside the assistant's reply. A
tokenizer that adds no BOS (SmolLM2's, GPT-2's) puts a text's first word at
that sink; ``tokenize(start=True)`` puts the start token there instead, so a
one-word prompt keeps its word.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from bake.checkpoint import staged_output
from bake.collection import sampling
from bake.errors import BakeError, OutputExists
from bake.recipe import ModelSample, Positions, Recipe, TextSource

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    counted: list[bool]

    @property
    def n_counted(self) -> int:
        return sum(self.counted)


def load_texts(source: TextSource, recipe: Recipe | None = None, what: str = "texts") -> list[str]:
    """Read a text source; empty lines and empty values are skipped."""
    if source.texts is not None:
        texts = list(source.texts)
    elif source.dataset is not None:
        texts = _hub_dataset(source, what)
    else:
        path = recipe.resolve(source.file) if recipe else Path(source.file)
        texts = _read_file(path, source, what)
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    return texts[: source.limit] if source.limit else texts


def _read_file(path: Path, source: TextSource, what: str) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8-sig")  # tolerate the BOM Excel writes
    except FileNotFoundError:
        raise BakeError(
            f"{what}: file {str(path)!r} not found: check the path (relative paths start at the recipe's folder)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BakeError(f"{what}: file {str(path)!r} cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return raw.splitlines()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw, newline=""))  # keeps line breaks inside quoted fields
        if source.column not in (reader.fieldnames or []):
            raise BakeError(f"{what}: {str(path)!r} has no column {source.column!r}: columns are {reader.fieldnames}")
        return [row[source.column] for row in reader]
    texts = []
    for n, line in enumerate(raw.split("\n"), 1):  # JSON strings may hold U+2028, which splitlines() breaks on
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BakeError(f"{what}: {str(path)!r} line {n} is not valid JSON: fix that line") from None
        if not isinstance(record, dict) or source.field not in record:
            raise BakeError(f"{what}: {str(path)!r} line {n} has no field {source.field!r}: check 'field'")
        texts.append(record[source.field])
    return texts


def _hub_dataset(source: TextSource, what: str) -> list[str]:
    try:
        import datasets  # optional
    except ImportError:
        raise BakeError(f"{what}: Hub datasets need the 'datasets' package: pip install 'bake[datasets]'") from None
    try:
        data = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as e:  # datasets raises many types for offline/missing cases
        raise BakeError(
            f"{what}: cannot load dataset {source.dataset!r} ({e.__class__.__name__}): check the id and that you are "
            "online"
        ) from None
    if source.field not in data.column_names:
        raise BakeError(
            f"{what}: dataset {source.dataset!r} has no field {source.field!r}: fields are {data.column_names}"
        )
    return list(data[source.field][: source.limit] if source.limit else data[source.field])


def digest(texts: list[str]) -> str:
    """sha256 of a text list (order-sensitive), recorded in manifests for provenance."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_tokens: int,
    chat: bool = False,
    chat_prompt: str = "",
    positions: Positions | None = None,
    start: bool = False,
) -> list[Example]:
    """Texts → examples. With ``chat``, each text is an assistant reply to ``chat_prompt``. ``positions`` picks
    the counted tokens: ``all`` (the whole sequence), ``reply`` (the reply's tokens: the vector is measured where the
    model speaks) or ``last`` (the text's last token, where function vectors are read); default: ``reply`` in chat
    mode, else ``all``. ``start``: a sequence that does not begin with a special token gets the start token in front
    (as ActAdd's prompts get BOS), so the uncounted sink position is that token, not the text's first word."""
    if chat and not tokenizer.chat_template:
        raise BakeError("chat: true, but the model's tokenizer has no chat template: set chat: false")
    positions = positions or ("reply" if chat else "all")
    special = set(tokenizer.all_special_ids)
    examples = []
    for text in texts:
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": chat_prompt}, {"role": "assistant", "content": text}], tokenize=False
            )
            reply = rendered.rindex(text)  # not ``start``: that flag says whether to prepend the start token
            span = (reply, reply + len(text)) if positions != "all" else None
            enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        else:
            span = None
            enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if start and not (ids and ids[0] in special):
            ids, offsets = [start_token(tokenizer), *ids], [(0, 0), *offsets]
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
        counted = [
            i > 0 and tok not in special and (span is None or (a >= span[0] and b <= span[1] and b > a))
            for i, (tok, (a, b)) in enumerate(zip(ids, offsets))
        ]
        examples.append(last_only(Example(ids, counted)) if positions == "last" else Example(ids, counted))
    return examples


def uncounted(tokenizer: PreTrainedTokenizerBase, text: str, example: Example, max_tokens: int) -> str:
    """Why ``text`` (tokenized as ``example``) has no position to average, and the fix: one clause of an error."""
    pieces = tokenizer.convert_ids_to_tokens(example.input_ids)
    if len(pieces) >= max_tokens:
        return f"{text!r} is cut at max_tokens ({max_tokens}) before any token that counts: raise max_tokens"
    if len(pieces) == 1 and example.input_ids[0] not in tokenizer.all_special_ids:
        return (
            f"{text!r} is the one token {pieces}, at the first position, the attention sink, which no mean counts (the "
            "tokenizer adds no BOS): give texts of two or more tokens"
        )
    return (
        f"{text!r} is the tokens {pieces}, none of which counts (not the first position, the attention sink, nor a "
        "special token such as an unknown word's): give texts of tokens the model knows"
    )


def last_only(example: Example) -> Example:
    """The example with only its last counted position still counted (none if it had none)."""
    last = max((i for i, c in enumerate(example.counted) if c), default=-1)
    return Example(example.input_ids, [i == last for i in range(len(example.counted))])


def sequences_to_examples(sequences: list[list[int]], tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    special = set(tokenizer.all_special_ids)
    return [Example(seq, [i > 0 and t not in special for i, t in enumerate(seq)]) for seq in sequences]


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token sampling starts from: BOS, or the end-of-text token that doubles as one (GPT-2)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise BakeError(
        "the tokenizer has neither a BOS nor an EOS token to sample background from: give a background corpus"
    )


ENGINES = ("transformers", "llama.cpp")
"""What samples a background: transformers' ``generate`` on the loaded model, or llama.cpp on the GGUF."""


def sample_engine(gguf: Path | None, recorded: str | None = None, requested: str = "transformers") -> str:
    """The engine to sample with: ``recorded`` (a rebuild reproduces the bake's samples with the engine that made
    them, or is refused), else the recipe's ``requested`` one (``auto``: llama.cpp when the model is a GGUF and
    llama-cpp-python is installed)."""
    usable = gguf is not None and sampling.available()
    why = "the base is not a GGUF file here" if gguf is None else "llama-cpp-python is not installed"
    if recorded == "llama.cpp" and not usable:
        raise BakeError(
            f"the background was sampled with llama.cpp, but {why}: {sampling.INSTALL} to reproduce the same samples"
        )
    if recorded is not None:
        return recorded
    if requested == "llama.cpp" and not usable:
        raise BakeError(f"background.sample.engine: llama.cpp, but {why}: {sampling.INSTALL}, or use transformers")
    if requested == "auto":
        return "llama.cpp" if usable else "transformers"
    return requested


def sample_background(
    model_factory: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    model_key: str,
    spec: ModelSample,
    seed: int,
    cache: Path,
    engine: str = "transformers",
    gguf: Path | None = None,
) -> tuple[list[list[int]], str]:
    """Sample ``spec.sequences`` sequences of ``spec.tokens`` tokens from the model, starting at BOS.

    ``model_factory()`` gives the model (``engine`` transformers), ``gguf`` its file (llama.cpp); either is used
    only when the cache misses. The model's own distribution is the best stand-in for its training data.
    Results are cached on disk keyed by model, engine and settings, so every run with the same settings uses
    identical background. Returns the token ids and the cache key.
    """
    start = start_token(tokenizer)
    settings = {"model": model_key, **spec.model_dump(exclude={"engine"}), "seed": seed, "start": start}
    if engine != "transformers":  # the key of a transformers sample stays what it was before there was a choice
        settings["engine"] = {"name": engine, "version": sampling.version()}  # the version made these samples
    key_src = json.dumps(settings, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    path = cache / "background" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["sequences"], key
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    if engine == "llama.cpp":
        assert gguf is not None, "sample_engine chooses llama.cpp only for a GGUF"
        sequences = sampling.sample(gguf, start, stops, spec.sequences, spec.tokens, spec.temperature, seed)
    else:
        sequences = _generate(model_factory(), start, stops, spec, seed, tokenizer.pad_token_id)
    with contextlib.suppress(OutputExists), staged_output(path, True, ours=lambda p: True, file=True) as tmp:
        tmp.write_text(json.dumps({"settings": json.loads(key_src), "sequences": sequences}))  # a cache entry is ours
    print(
        f"sampled background: {len(sequences)} sequences of up to {spec.tokens} tokens with {engine}, cached in {path}",
        file=sys.stderr,
    )
    return sequences, key


@torch.inference_mode()
def _generate(
    model: PreTrainedModel, start: int, stops: set[int], spec: ModelSample, seed: int, pad: int | None
) -> list[list[int]]:
    """transformers' sampling, 32 sequences per ``generate`` call, seeded once for the whole background."""
    sequences: list[list[int]] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # leave=False: a kept bar is drawn again at close, so a log showed "100%" twice; one summary line instead.
        for first in tqdm(range(0, spec.sequences, 32), desc="sampling background", unit="batch", leave=False):
            ids = torch.full((min(32, spec.sequences - first), 1), start, dtype=torch.long)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=spec.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=spec.tokens - 1,
                pad_token_id=pad,
            )
            for row in out.tolist():
                # A sequence ends at its first end-of-text token; what follows is padding.
                end = next((i for i, t in enumerate(row[1:], 1) if t in stops), len(row))
                sequences.append(row[:end])
    return sequences
