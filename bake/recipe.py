"""Recipe schema: YAML → validated, typed objects whose errors name the field.

Every model forbids unknown keys, so a misspelled key is an error rather than a
silently ignored setting. The recipe text is kept verbatim for the manifest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from bake.errors import BakeError
from bake.families.hf import Site
from bake.gguffile import is_gguf

Method = Literal["mean-centred", "mean", "actadd", "contrast"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Positions = Literal["all", "last", "reply"]
"""Which positions of a text enter a mean: every token, the last token, or the assistant reply's tokens (chat)."""
Collection = Literal["auto", "memory", "streaming"]
"""How activations are collected and outputs verified: all blocks 0..L in memory, or one block at a time."""


def _not_bool(value: Any) -> Any:
    """YAML reads ``yes``/``no``/``true`` as booleans, which pydantic would take as 1 and 0: refuse them."""
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a yes/no value, not a number: write the number")
    return value


Integer = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSource(_Strict):
    """Where texts come from. Shorthands: a string is a file path, a list is inline texts.

    - ``.txt``: one text per line; ``.jsonl``: the ``field`` of each record;
      ``.csv``: the ``column`` of each row; ``texts``: inline;
    - ``dataset``: a Hugging Face Hub dataset (needs the ``datasets`` package), read
      from ``split`` and ``field``.
    """

    file: str | None = None
    texts: list[str] | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    field: str | None = None
    column: str | None = None
    limit: Integer | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"file": value}
        if isinstance(value, list):
            return {"texts": value}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> TextSource:
        kinds = [k for k in ("file", "texts", "dataset") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of 'file', 'texts' or 'dataset'")
        if self.file is not None:
            suffix = Path(self.file).suffix.lower()
            if suffix not in (".txt", ".jsonl", ".csv"):
                raise ValueError(f"file {self.file!r}: use a .txt, .jsonl or .csv file")
            if suffix == ".jsonl" and not self.field:
                raise ValueError(f"file {self.file!r}: a .jsonl source needs 'field' (the key holding the text)")
            if suffix == ".csv" and not self.column:
                raise ValueError(f"file {self.file!r}: a .csv source needs 'column' (the column holding the text)")
        if self.dataset is not None and not self.field:
            raise ValueError(f"dataset {self.dataset!r} needs 'field' (the column holding the text)")
        return self


class ModelSample(_Strict):
    """Background sampled from the model itself: ``sequences`` × ``tokens`` from its BOS token."""

    sequences: Integer = Field(default=128, ge=1)
    tokens: Integer = Field(default=64, ge=2)
    temperature: Number = Field(default=1.0, gt=0)
    engine: Literal["transformers", "llama.cpp", "auto"] = Field(
        default="transformers",
        description="what samples it: transformers' generate, llama.cpp straight from a GGUF base (needs "
        "llama-cpp-python; faster on CPU, other samples, so other figures), or 'auto' (llama.cpp when it can)",
    )


class Background(_Strict):
    """Either ``sample`` (the model's own distribution, the default) or a text ``corpus``."""

    sample: ModelSample | None = None
    corpus: TextSource | None = None
    positions: Literal["all", "last"] = Field(
        default="all",
        description="'last': each background text's last token only (function vectors: the mean over all tasks' "
        "prompts at their last token)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Background:
        if (self.sample is None) == (self.corpus is None):
            raise ValueError("give exactly one of 'sample' (model-sampled text) or 'corpus' (a text source)")
        return self


_METHOD_FIELDS: dict[str, set[str]] = {
    "mean-centred": {"target"},
    "mean": {"target"},
    "actadd": {"positive_prompt", "negative_prompt"},
    "contrast": {"positive", "negative"},
}
_OPTIONAL_FIELDS: dict[str, set[str]] = {"mean-centred": {"background"}}


class Steering(_Strict):
    """One behaviour: a vector measured and added at ``site`` of block ``layer``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    layer: int | Literal["auto"] = Field(
        description="0-based block index; the vector is added after this block. 'auto': the layer of "
        "evaluate.layers whose best setting within evaluate.max_kl has the most effect (one sweep)"
    )
    site: Site = "resid_post"
    method: Method = "mean-centred"
    coefficient: float | Literal["auto"] = Field(
        default=1.0, description="'auto': the largest of evaluate.coefficients whose KL stays within evaluate.max_kl"
    )
    target: TextSource | None = None
    background: Background | None = None
    positive: TextSource | None = None
    negative: TextSource | None = None
    positive_prompt: str | None = None
    negative_prompt: str | None = None
    chat: bool = False
    chat_prompt: str = "Say something."
    positions: Positions | None = Field(
        default=None,
        description="where the texts are measured: 'all' tokens, the 'last' token of each text, or the 'reply' "
        "tokens (needs chat: true); default 'reply' with chat: true, else 'all'. The baked bias still adds the "
        "vector at every position",
    )

    @field_validator("layer", mode="before")
    @classmethod
    def _block_or_auto(cls, value: Any) -> Any:
        if value != "auto" and (not isinstance(_not_bool(value), int) or value < 0):
            raise ValueError(
                f"layer is a 0-based block index (an integer greater than or equal to 0) or 'auto', not {value!r}"
            )
        return value

    @field_validator("coefficient", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(_not_bool(value), (int, float)):
            raise ValueError(f"coefficient is a number or 'auto', not {value!r}")
        return value

    @field_validator("coefficient")
    @classmethod
    def _finite(cls, value: float | str) -> float | str:
        if value != "auto" and not math.isfinite(value):
            raise ValueError("coefficient must be a finite number")
        return value

    @model_validator(mode="after")
    def _default_positions(self) -> Steering:
        if self.positions is None:
            self.positions = "reply" if self.chat else "all"
        elif self.positions == "reply" and not self.chat:
            raise ValueError("positions 'reply' counts an assistant reply's tokens: set chat: true, or use 'all'")
        return self

    @model_validator(mode="after")
    def _fields_fit_method(self) -> Steering:
        needed = _METHOD_FIELDS[self.method]
        allowed = needed | _OPTIONAL_FIELDS.get(self.method, set())
        every = set().union(*_METHOD_FIELDS.values()) | {"background"}
        missing = sorted(f for f in needed if getattr(self, f) is None)
        if missing:
            raise ValueError(f"method {self.method!r} needs {', '.join(missing)}")
        extra = sorted(f for f in every - allowed if getattr(self, f) is not None)
        if extra:
            raise ValueError(f"method {self.method!r} does not use {', '.join(extra)}: remove it or change method")
        return self


class VerifySpec(_Strict):
    """Probe prompts on which the baked model must match the hook-steered base."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "The weather today is",
            "Here is a short story about a dog:",
            "Question: What is the capital of France?\nAnswer:",
        ],
        min_length=1,
    )
    tokens: Integer = Field(default=16, ge=1)
    atol: Number | None = Field(default=None, gt=0, description="max |Δlogit|; default depends on dtype")
    scope: Literal["all", "steered"] = Field(
        default="all",
        description="'steered' builds both models with blocks 0..L only (L the deepest steered block), for models "
        "too big to load twice; later blocks are unchanged by construction (only zero biases are added there)",
    )


class PreviewSpec(_Strict):
    """Base vs steered continuations printed at the end of ``bake run``."""

    prompts: list[str] = Field(default_factory=lambda: ["Tell me about your day."])
    tokens: Integer = Field(default=40, ge=1)
    chat: bool = True


Scorer = Literal["wordlist", "vader", "toxicity", "classifier", "length", "logprob_gain", "activation_shift"]
# What each figure is, for tables, plots and the model card.
LABELS = {
    "kl": "KL(base ‖ steered) on neutral text, nats/token",
    "perplexity": "perplexity on background text",
    "repetition": "repeated-trigram rate of replies",
    "wordlist": "rate of target-specific words in replies",
    "vader": "VADER sentiment of replies (-1..1)",
    "toxicity": "offensiveness probability of replies",
    "classifier": "classifier probability of replies",
    "length": "words per reply",
    "logprob_gain": "log-prob gain of held-out target text, nats/token",
    "activation_shift": "activation shift of held-out target text (d')",
}

# Held-out defaults: none of these appear in the recipes' data. Kept small so an evaluation runs in minutes on CPU.
DEFAULT_EVAL_PROMPTS = [
    "How do I renew my passport?",
    "Describe the process of doing laundry.",
    "What should I know before adopting a cat?",
    "My laptop battery drains quickly. What can I do?",
    "Summarize the plot of a detective novel.",
    "How do trains get their power?",
]
DEFAULT_NEUTRAL = [
    "The meeting is scheduled for Tuesday at ten in the morning in the second floor conference room.",
    "Copper conducts electricity well, which is why it is widely used in household wiring.",
    "The recipe calls for two cups of flour, one teaspoon of salt and half a cup of water.",
    "Trains leave the central station every fifteen minutes between six in the morning and midnight.",
    "The report lists the number of visitors to the museum in each month of the previous year.",
    "To change the printer cartridge, open the front panel and pull the old cartridge toward you.",
    "The river flows north for about two hundred kilometres before it reaches the sea.",
    "Applications for the program must be submitted by the end of March, together with two references.",
    "The software update changes the default settings and fixes several minor problems with the display.",
    "Most adult cats sleep between twelve and sixteen hours a day, usually in short periods.",
    "The bridge was built in 1932 and was repaired after a flood damaged one of its supports.",
    "Each chapter of the textbook ends with a short summary and a list of exercises.",
]


class ClassifierSpec(_Strict):
    """A Hugging Face text-classification model (local folder or Hub id): the score is the mean probability of
    ``label``."""

    model: str
    label: str = Field(
        description="the class whose probability is the score, as the model's config names it (id2label)"
    )


class CompareSpec(_Strict):
    """What ``bake compare`` needs beyond the steering entry: negative texts for ``contrast``, a prompt pair for
    ``actadd``."""

    negative: TextSource | None = None
    positive_prompt: str | None = None
    negative_prompt: str | None = None
    on_run: bool = Field(
        default=False,
        description="bake run also compares the methods on the first entry's data at evaluate.max_kl and notes one "
        "that clearly beats the entry's method on the headline scorer (recorded in the manifest; minutes on a real "
        "model: about what bake compare takes without its curves)",
    )


class EvaluateSpec(_Strict):
    """How ``bake sweep``/``compare``/``eval`` and ``coefficient: auto`` measure a steering: effect against fluency
    cost.

    Effects (``scorers``; the first one is the headline in tables and plots): ``wordlist`` (rate of words specific to
    the target texts in greedy replies to ``prompts``), ``vader`` (mean VADER compound sentiment), ``toxicity``
    (alt-profanity-check probability), ``classifier`` (probability of a label), ``length`` (words per reply),
    ``logprob_gain`` (nats per token of held-out target text), ``activation_shift`` (held-out target vs neutral
    along the vector, in standard deviations).
    Costs, always measured: KL(base ‖ steered) on ``neutral``, perplexity on ``background``, repetition of replies.
    """

    prompts: TextSource = Field(default_factory=lambda: TextSource(texts=DEFAULT_EVAL_PROMPTS))
    chat: bool = Field(default=True, description="prompts as user turns of the chat template")
    tokens: Integer = Field(default=32, ge=1, description="new tokens per greedy reply")
    scorers: list[Scorer] = Field(
        default_factory=lambda: ["wordlist", "logprob_gain", "activation_shift"], min_length=1
    )
    words: TextSource | None = Field(
        default=None, description="word list for 'wordlist' (default: derived from the target texts)"
    )
    top_words: Integer = Field(default=40, ge=1, description="size of the derived word list")
    classifier: ClassifierSpec | None = None
    neutral: TextSource = Field(default_factory=lambda: TextSource(texts=DEFAULT_NEUTRAL))
    background: TextSource | None = Field(default=None, description="held-out text for perplexity (default: neutral)")
    target: TextSource | None = Field(
        default=None, description="held-out target texts (default: the entry's own, in-sample)"
    )
    max_kl: Number = Field(
        default=0.5, gt=0, description="KL budget (nats per token) for coefficient: auto and bake compare"
    )
    coefficients: list[Number] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0], min_length=1
    )
    layers: list[Annotated[Integer, Field(ge=0)]] | None = Field(
        default=None, min_length=1, description="the candidate blocks of layer: auto (bake sweep's default for it)"
    )
    goal: Literal["raise", "lower"] = Field(
        default="raise",
        description="whether the steering should raise or lower the headline scorer (lower: e.g. toxicity, steering "
        "away from it); what evaluate.compare.on_run counts as beating",
    )
    compare: CompareSpec = Field(default_factory=CompareSpec)

    @field_validator("coefficients")
    @classmethod
    def _positive_finite(cls, value: list[float]) -> list[float]:
        bad = [c for c in value if not (math.isfinite(c) and c > 0)]
        if bad:
            raise ValueError(f"coefficients must be positive finite numbers, not {bad}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _classifier_given(self) -> EvaluateSpec:
        if "classifier" in self.scorers and self.classifier is None:
            raise ValueError("scorer 'classifier' needs 'classifier: {model: PATH_OR_ID, label: LABEL}'")
        return self


class Recipe(_Strict):
    """A whole bake: one base model, one or more steering entries."""

    model: str = Field(description="local HF folder, Hub id, .gguf file, or pkg:PACKAGE/FILE")
    revision: str | None = None
    base_model_id: str | None = Field(default=None, description="Hub id named in the model card")
    output: str | None = None
    output_format: Literal["hf", "gguf"] = Field(
        default="hf", description="'gguf': write the GGUF base with the steering as bias tensors (llama.cpp, Ollama)"
    )
    dtype: DType = "auto"
    seed: Integer = 0
    max_tokens: Integer = Field(default=256, ge=2, description="texts are truncated to this many tokens")
    batch_tokens: Integer = Field(default=4096, ge=16)
    collection: Collection = Field(
        default="auto",
        description="'streaming' loads one block at a time (a model bigger than memory); 'auto' "
        "streams when blocks 0..L do not fit in the memory available (bake.collection.streaming)",
    )
    background: Background = Field(default_factory=lambda: Background(sample=ModelSample()))
    steering: list[Steering] = Field(min_length=1)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    preview: PreviewSpec = Field(default_factory=PreviewSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    allow_remote_code: bool = Field(
        default=False,
        description="bake sites with no stock bias slot (Gemma 2/3, OLMo 2) into a constant-bias module: the output "
        "then loads only with trust_remote_code=True (transformers, vLLM), and TGI and llama.cpp ignore the steering",
    )

    _text: str = PrivateAttr(default="")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _gguf_output(self) -> Recipe:
        if self.output_format == "gguf":
            if not is_gguf(self.model):
                raise ValueError(
                    "output_format 'gguf' needs a .gguf model (a file or pkg:PACKAGE/FILE.gguf): "
                    "a GGUF is written by adding biases to one"
                )
            if self.dtype != "auto" or self.allow_remote_code:
                raise ValueError(
                    "output_format 'gguf' keeps the file's own tensor types and runs no transformers code: "
                    "remove dtype and allow_remote_code"
                )
        return self

    @model_validator(mode="after")
    def _auto_layers(self) -> Recipe:
        for i, entry in enumerate(self.steering):
            if entry.layer == "auto" and self.evaluate.layers is None:
                raise ValueError(
                    f"steering.{i}.layer: auto picks from evaluate.layers, which is not set: list the candidate "
                    "blocks, e.g. 'evaluate: {layers: [6, 9, 12, 15]}'"
                )
        return self

    @model_validator(mode="after")
    def _compare_on_run(self) -> Recipe:
        if self.evaluate.compare.on_run and self.steering[0].method == "actadd":
            raise ValueError(
                "evaluate.compare.on_run compares the methods on the first steering entry's texts, but it is actadd "
                "(two prompts): put an entry with target or positive texts first, or remove on_run"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [s.name for s in self.steering]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"steering names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def text(self) -> str:
        """The recipe exactly as written (kept verbatim in the output manifest)."""
        return self._text

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are read from."""
        return self._base_dir

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self._base_dir / p

    def layers_of(self, entry: Steering) -> list[int]:
        """The blocks ``entry`` may be added after: its layer, or the candidates of ``layer: auto``."""
        return sorted(set(self.evaluate.layers or [])) if entry.layer == "auto" else [entry.layer]

    def background_for(self, entry: Steering) -> Background:
        return entry.background or self.background


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated key instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def describe_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem, each naming the field (``steering.0.method``) and the fix."""
    parts = []
    for e in err.errors():
        loc = (
            ".".join(
                p if isinstance(p, str) and p.isprintable() else repr(p) if isinstance(p, str) else str(p)
                for p in e["loc"]
            )
            or "recipe"
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field: check its spelling or remove it"
        elif e["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def parse_recipe(text: str, base_dir: Path, where: str = "recipe") -> Recipe:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise BakeError(f"{where}: not valid YAML{at}{problem}: fix the syntax") from None
    if not isinstance(data, dict):
        raise BakeError(f"{where}: a recipe is a YAML mapping with at least 'model' and 'steering'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise BakeError(describe_validation_error(e, where)) from None
    recipe._text = text
    recipe._base_dir = base_dir
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BakeError(f"recipe {str(path)!r} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BakeError(f"recipe {str(path)!r} cannot be read ({e.__class__.__name__}): check the file") from None
    return parse_recipe(text, path.resolve().parent, where=str(path))
