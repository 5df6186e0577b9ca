"""Measuring a steering: what it changes (effect) against what it costs in fluency.

A bias acts at every position, so a coefficient must be calibrated, not copied:
these figures are what ``bake sweep``, ``bake compare``, ``bake eval`` and
``coefficient: auto`` decide on. Everything is measured against the same base
model on fixed held-out data, greedy, so a run is deterministic.

Effects (``evaluate.scorers``):
- ``wordlist``: rate of words specific to the target texts (the derived or given list) in greedy replies
  to the held-out prompts (Jorgensen et al.'s genre measure);
- ``vader`` / ``toxicity`` / ``classifier``: mean VADER compound sentiment, alt-profanity-check probability,
  or a text-classification model's probability of a label, over the same replies;
- ``logprob_gain``: mean log-probability per token of held-out target texts, steered minus base (nats);
- ``activation_shift``: held-out target minus neutral texts along the vector's direction at its point, in
  pooled standard deviations (d'): does the direction generalise to unseen target text? (no generation,
  independent of the coefficient).
Costs: KL(base ‖ steered) of next-token distributions on neutral text averaged over positions, perplexity
on held-out background text, and the repeated-trigram rate of the replies.
"""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bake.checkpoint import require_safetensors
from bake.collection.activations import Moments, batches, collect, padded
from bake.collection.texts import Example, load_texts, sample_background, tokenize
from bake.errors import BakeError
from bake.families.hf import Site, family_for
from bake.recipe import EvaluateSpec, Recipe, Steering, TextSource
from bake.sources.load import prompt_ids
from bake.sources.resolve import cache_dir
from bake.vectorfile import VectorSet

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Padded tokens per evaluation batch: full-vocabulary log-probs are kept for every position of a batch.
EVAL_BATCH_TOKENS = 1024
# Without held-out target texts, logprob_gain and activation_shift use this many of the entry's own (each is a forward
# pass per setting).
IN_SAMPLE_TEXTS = 32
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def derive_words(target: list[str], reference: list[str], k: int = 40, min_count: int = 2) -> list[str]:
    """The ``k`` words most specific to ``target`` against ``reference``: highest smoothed log ratio of their
    rate in the target texts to their rate in the reference, among words seen ``min_count`` times in the
    target and at least twice as frequent there."""
    t, r = Counter(w for s in target for w in words_of(s)), Counter(w for s in reference for w in words_of(s))
    nt, nr, vocab = sum(t.values()), sum(r.values()), len(t.keys() | r.keys())
    score = {
        w: math.log((t[w] + 0.5) / (nt + 0.5 * vocab)) - math.log((r[w] + 0.5) / (nr + 0.5 * vocab))
        for w in t
        if t[w] >= min_count
    }
    return sorted((w for w in score if score[w] >= math.log(2)), key=lambda w: (-score[w], w))[:k]


def word_rate(texts: list[str], words: list[str]) -> float:
    """Fraction of all words in ``texts`` that are in ``words``."""
    vocab = {w.lower() for w in words}
    tokens = [w for t in texts for w in words_of(t)]
    return sum(w in vocab for w in tokens) / len(tokens) if tokens else 0.0


def repetition(texts: list[str], n: int = 3) -> float:
    """Mean over texts of the fraction of word n-grams that repeat an earlier one (0: none; near 1: a loop)."""
    rates = []
    for t in texts:
        w = words_of(t)
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        rates.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates) if rates else 0.0


def reply_length(texts: list[str]) -> float:
    """Mean words per reply: what a concise steering shortens (replies stop at the token budget, so set
    ``evaluate.tokens`` above the base model's usual reply length)."""
    return sum(len(words_of(t)) for t in texts) / len(texts) if texts else 0.0


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BakeError(f"this scorer needs the {package!r} package: pip install 'bake[eval]'") from None


def vader_scorer() -> Callable[[list[str]], float]:
    """Mean VADER compound sentiment (-1 negative .. +1 positive)."""
    analyzer = _need("vaderSentiment.vaderSentiment", "vaderSentiment").SentimentIntensityAnalyzer()
    return lambda texts: sum(analyzer.polarity_scores(t)["compound"] for t in texts) / max(1, len(texts))


def toxicity_scorer() -> Callable[[list[str]], float]:
    """Mean probability of offensive language (alt-profanity-check: a linear model on words, offline)."""
    predict_prob = _need("profanity_check", "alt-profanity-check").predict_prob
    return lambda texts: float(predict_prob(list(texts)).mean()) if texts else 0.0


def classifier_scorer(model: str, label: str) -> Callable[[list[str]], float]:
    """Mean probability of ``label`` under a Hugging Face text-classification model (folder or Hub id)."""
    from transformers import pipeline  # startup

    if Path(model).is_dir():
        require_safetensors(Path(model))
    try:  # safetensors only, for a Hub classifier too: bake never loads pickles
        pipe = pipeline(
            "text-classification", model=model, top_k=None, device="cpu", model_kwargs={"use_safetensors": True}
        )
    except (OSError, ValueError) as e:
        raise BakeError(
            f"evaluate.classifier.model: cannot load {model!r} as a text-classification model "
            f"({e.__class__.__name__}): give a local folder or a Hub id"
        ) from None
    labels = list(pipe.model.config.id2label.values())
    if label not in labels:
        raise BakeError(f"evaluate.classifier.label: {model!r} has no label {label!r}: its labels are {labels}")

    def score(texts: list[str]) -> float:
        if not texts:
            return 0.0
        results = pipe(list(texts), truncation=True)
        return sum(next(r["score"] for r in rs if r["label"] == label) for rs in results) / len(texts)

    return score


@dataclass
class Spread(Moments):
    """Moments plus the sum of outer products: the variance along any direction, chosen after collecting."""

    outer: torch.Tensor | None = None

    @classmethod
    def zeros(cls, hidden: int) -> Spread:
        return cls(torch.zeros(hidden, dtype=torch.float64), outer=torch.zeros(hidden, hidden, dtype=torch.float64))

    def add(self, acts: torch.Tensor) -> None:
        super().add(acts)
        a = acts.to(torch.float64)
        self.outer += a.T @ a

    def all_reduce(self) -> None:
        super().all_reduce()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.outer)

    def along(self, u: torch.Tensor) -> tuple[float, float]:
        """Mean and variance of the projections on the unit vector ``u``."""
        mean = float(self.total @ u) / self.count
        return mean, max(0.0, float(u @ self.outer @ u) / self.count - mean**2)


def separation(target: Spread, reference: Spread, v: torch.Tensor) -> float:
    """(mean target − mean reference) projected on v/|v|, in pooled standard deviations of those projections."""
    u = v.to(torch.float64) / v.norm()
    (mt, vt), (mr, vr) = target.along(u), reference.along(u)
    sd = math.sqrt((vt + vr) / 2)
    return (mt - mr) / sd if sd > 0 else 0.0


@dataclass
class EvalData:
    """The held-out material of one evaluation, tokenized, and where each part came from."""

    prompts: list[str]
    chat: bool
    tokens: int
    scorers: list[str]
    neutral: list[Example]
    background: list[Example]
    target: list[Example] | None = None
    reference: list[Example] | None = None
    """The neutral texts framed like the target texts (as replies in chat mode): activation shift's baseline."""
    words: list[str] | None = None
    classifier: tuple[str, str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def headline(self) -> str | None:
        """The effect shown in tables and plots: the first scorer that can be measured."""
        return self.scorers[0] if self.scorers else None


def _examples(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    what: str,
    max_tokens: int,
    chat: bool = False,
    chat_prompt: str = "",
) -> list[Example]:
    examples = tokenize(tokenizer, texts, max_tokens, chat, chat_prompt)
    if not any(e.n_counted > 1 for e in examples):
        raise BakeError(f"{what}: no text has two tokens to predict ({len(texts)} texts): give longer or more texts")
    return examples


def _background_texts(
    recipe: Recipe,
    entry: Steering,
    tokenizer: PreTrainedTokenizerBase,
    model_key: str,
    model_factory: Callable[[], PreTrainedModel],
) -> list[str]:
    """The entry's background as text (a sampled background is decoded): the reference for a derived word list."""
    bg = recipe.background_for(entry)
    if bg.corpus is not None:
        return load_texts(bg.corpus, recipe, "background.corpus")
    sequences, _ = sample_background(model_factory, tokenizer, model_key, bg.sample, recipe.seed, cache_dir())
    return [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]


def target_source(entry: Steering) -> TextSource | list[str] | None:
    """The texts that show an entry's behaviour: its target, its positive texts, or its positive prompt."""
    if entry.method == "actadd":
        return [entry.positive_prompt]
    return entry.target if entry.target is not None else entry.positive


def build_data(
    spec: EvaluateSpec,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe | None = None,
    entry: Steering | None = None,
    model_key: str = "",
    model_factory: Callable[[], Any] | None = None,
    prompts: list[str] | None = None,
    need_effect: bool = True,
) -> EvalData:
    """Read and tokenize what ``spec`` names (relative to ``recipe``); ``entry`` is the steering whose target
    texts give the word list and the default held-out target. Scorers that cannot be measured without a
    target are dropped and listed in ``skipped``; unless ``need_effect``, costs alone are a valid evaluation."""
    max_tokens = recipe.max_tokens if recipe else 256
    read = lambda source, what: load_texts(source, recipe, what)  # noqa: E731
    prompts = prompts or read(spec.prompts, "evaluate.prompts")
    if not prompts:
        raise BakeError("evaluate.prompts: no prompts: give at least one")
    neutral_texts = read(spec.neutral, "evaluate.neutral")
    neutral = _examples(tokenizer, neutral_texts, "evaluate.neutral", max_tokens)
    background = (
        _examples(tokenizer, read(spec.background, "evaluate.background"), "evaluate.background", max_tokens)
        if spec.background
        else neutral
    )
    info: dict[str, Any] = {
        "prompts": len(prompts),
        "tokens": spec.tokens,
        "chat": spec.chat,
        "neutral_texts": len(neutral_texts),
        "background": "evaluate.background" if spec.background else "evaluate.neutral",
    }
    data = EvalData(prompts, spec.chat, spec.tokens, list(spec.scorers), neutral, background, info=info)
    if spec.classifier:
        path = recipe.resolve(spec.classifier.model) if recipe else Path(spec.classifier.model)
        data.classifier = (str(path) if path.exists() else spec.classifier.model, spec.classifier.label)
    own = target_source(entry) if entry else None
    own_texts = (
        (own if isinstance(own, list) else read(own, f"steering {entry.name} target")) if own is not None else None
    )
    if spec.target is not None:
        held_out, info["target"] = read(spec.target, "evaluate.target"), "evaluate.target (held out)"
    else:
        held_out = own_texts[:IN_SAMPLE_TEXTS] if own_texts else None
        info["target"] = (
            f"the steering entry's own texts, the first {IN_SAMPLE_TEXTS} at most (in-sample: set evaluate.target to "
            "hold some out)"
        )
    if held_out:
        chat, chat_prompt = (entry.chat, entry.chat_prompt) if entry else (False, "")
        data.target = _examples(tokenizer, held_out, "evaluate.target", max_tokens, chat, chat_prompt)
        data.reference = _examples(tokenizer, neutral_texts, "evaluate.neutral", max_tokens, chat, chat_prompt)
        info["target_texts"] = len(held_out)
    if spec.words is not None:
        data.words = read(spec.words, "evaluate.words")
        info["words"] = "evaluate.words"
    elif own_texts and recipe is not None and "wordlist" in spec.scorers:
        reference = neutral_texts + _background_texts(recipe, entry, tokenizer, model_key, model_factory)
        data.words = derive_words(own_texts, reference, spec.top_words)
        info["words"] = (
            f"derived: the {len(data.words)} words most specific to the target texts against background and neutral "
            "texts"
        )
    needs = {"wordlist": data.words, "logprob_gain": data.target, "activation_shift": data.target}
    for name in list(data.scorers):
        if name in needs and not needs[name]:
            data.skipped[name] = "no target texts or word list: give evaluate.target / evaluate.words"
            data.scorers.remove(name)
    if not data.scorers and need_effect:
        raise BakeError(
            f"evaluate.scorers: none can be measured here ({'; '.join(f'{k}: {v}' for k, v in data.skipped.items())})"
        )
    if data.words is not None:
        info["word_list"] = data.words
    return data


Predictions = list[tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def _predictions(
    model: PreTrainedModel, examples: list[Example], pad_id: int, settings: int = 1
) -> Iterator[list[Predictions]]:
    """Per batch and per setting: log-probs [n, vocab] at every position that predicts a counted token, and those
    tokens [n]. With ``settings`` K, each batch is repeated K times, settings-major (``bake.verify.steered`` with K
    vector sets steers block i of the rows as setting i): the same padding and positions as one setting alone."""
    device = model.get_input_embeddings().weight.device
    for group in batches(examples, EVAL_BATCH_TOKENS):
        ids, attention, counted = padded(group, pad_id)
        predicts = counted[:, 1:]  # position p predicts token p + 1
        # The LM head only at positions some row needs (a chat template's prefix is most of a short reply).
        keep = predicts.any(0).nonzero()[:, 0]
        logits = model(
            input_ids=ids.repeat(settings, 1).to(device),
            attention_mask=attention.repeat(settings, 1).to(device),
            use_cache=False,
            logits_to_keep=keep.to(device),
        ).logits
        mask = predicts[:, keep].to(device)
        targets = ids[:, 1:][:, keep].to(device)[mask]
        yield [(torch.log_softmax(x[mask].float(), dim=-1), targets) for x in logits.chunk(settings)]


def _nll(model: PreTrainedModel, examples: list[Example], pad_id: int, settings: int = 1) -> list[tuple[float, int]]:
    """Per setting: total negative log-likelihood of the counted tokens, and how many there are."""
    totals = [[0.0, 0] for _ in range(settings)]
    for group in _predictions(model, examples, pad_id, settings):
        for total, (logp, targets) in zip(totals, group):
            total[0] -= float(logp.gather(1, targets[:, None]).sum())
            total[1] += len(targets)
    return [(nll, n) for nll, n in totals]


@torch.inference_mode()
def replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    tokens: int,
    chat: bool,
    settings: int = 1,
) -> list[list[str]]:
    """Per setting, greedy replies: all prompts in one left-padded batch (3x faster than one by one on CPU; the
    same batch every time, so deterministic), repeated ``settings`` times, settings-major, to decode together."""
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids]).repeat(settings, 1)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]).repeat(settings, 1)
    device = model.get_input_embeddings().weight.device
    out = model.generate(
        x.to(device), attention_mask=mask.to(device), max_new_tokens=tokens, do_sample=False, pad_token_id=pad
    )
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return [texts[i : i + len(prompts)] for i in range(0, len(texts), len(prompts))]


class Evaluator:
    """Figures of a steered model against the base on fixed held-out data.

    The base's own figures are measured once, at construction (the steered model may be the base itself
    with hooks, ``bake.verify.steered``, so they cannot be measured later). ``points`` are where the
    vectors to evaluate will sit: the held-out target and neutral activations there are summarised
    up front for ``activation_shift``. ``effects=False`` measures costs only (no generation).
    """

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        data: EvalData,
        points: Sequence[tuple[int, Site]] = (),
        effects: bool = True,
    ) -> None:
        self.tokenizer, self.data, self.effects = tokenizer, data, effects
        self.pad = tokenizer.pad_token_id
        self._neutral = [group for (group,) in _predictions(base, data.neutral, self.pad)]
        self._target_nll = (
            _nll(base, data.target, self.pad)[0] if effects and data.target and "logprob_gain" in data.scorers else None
        )
        self.spreads: dict[str, dict[tuple[int, Site], Spread]] = {}
        if points and data.target and "activation_shift" in data.scorers:
            family = family_for(base.config)
            for name, examples in (("target", data.target), ("reference", data.reference)):
                self.spreads[name] = collect(
                    base,
                    family,
                    examples,
                    sorted(set(points)),
                    EVAL_BATCH_TOKENS,
                    self.pad,
                    desc=f"activations ({name})",
                    kind=Spread,
                )
        self._scorers = {name: TEXT_SCORERS[name](data) for name in data.scorers if effects and name in TEXT_SCORERS}
        neutral_nll = -sum(float(logp.gather(1, t[:, None]).sum()) for logp, t in self._neutral)
        self.base: dict[str, Any] = {"kl": 0.0, "perplexity": self._perplexity(base, [neutral_nll], 1)[0]}
        if effects:
            self.base.update(self._generation_figures(base, 1)[0])
            self.base.update({k: 0.0 for k in ("logprob_gain",) if k in data.scorers})

    def _perplexity(self, model: PreTrainedModel, neutral_nll: list[float], settings: int) -> list[float]:
        """Per setting, on the background texts; when they are the neutral ones, from the NLL of the predictions
        already made on them."""
        if self.data.background is self.data.neutral:
            n = sum(len(t) for _, t in self._neutral)
            return [math.exp(nll / n) for nll in neutral_nll]
        return [math.exp(nll / n) for nll, n in _nll(model, self.data.background, self.pad, settings)]

    def costs_each(self, model: PreTrainedModel, settings: int = 1) -> list[dict[str, float]]:
        """Per setting, KL(base ‖ model) per position on the neutral texts and perplexity on the background texts;
        ``model`` computes setting i on block i of every batch's rows (``bake.verify.steered`` with a list)."""
        kl, nll = [0.0] * settings, [0.0] * settings
        for (base, t), group in zip(self._neutral, _predictions(model, self.data.neutral, self.pad, settings)):
            p = base.exp()
            for i, (logp, _) in enumerate(group):
                kl[i] += float((p * (base - logp)).sum())
                nll[i] -= float(logp.gather(1, t[:, None]).sum())
        n = sum(len(t) for _, t in self._neutral)
        return [{"kl": k / n, "perplexity": ppl} for k, ppl in zip(kl, self._perplexity(model, nll, settings))]

    def costs(self, model: PreTrainedModel) -> dict[str, float]:
        """KL(base ‖ model) per position on the neutral texts, and perplexity on the background texts."""
        return self.costs_each(model)[0]

    def _generation_figures(self, model: PreTrainedModel, settings: int) -> list[dict[str, Any]]:
        out = []
        for texts in replies(model, self.tokenizer, self.data.prompts, self.data.tokens, self.data.chat, settings):
            figures: dict[str, Any] = {name: fn(texts) for name, fn in self._scorers.items()}
            figures["repetition"] = repetition(texts)
            figures["replies"] = texts
            out.append(figures)
        return out

    def activation_shift(self, vectors: VectorSet) -> float | None:
        """Separation (d') along each vector at its point, averaged over the vectors (None if not measured)."""
        values = [
            separation(self.spreads["target"][p], self.spreads["reference"][p], v)
            for p, v in vectors.vectors.items()
            if self.spreads and p in self.spreads["target"] and float(v.norm()) > 0
        ]
        return sum(values) / len(values) if values else None

    def measure_each(self, model: PreTrainedModel, settings: list[VectorSet | None]) -> list[dict[str, Any]]:
        """Every figure for each of K settings at once: ``model`` is the base steered by the K vector sets through
        hooks (``bake.verify.steered(model, family, settings)``: block i of every batch's rows is setting i), or,
        with K = 1, a baked checkpoint. Each row computes what it would alone, so the figures are those of one
        setting at a time (up to float32 rounding in batched matmuls: the tokens are compared exactly in tests)."""
        k = len(settings)
        each: list[dict[str, Any]] = self.costs_each(model, k)
        if not self.effects:
            return each
        if self._target_nll is not None:
            for figures, (nll, n) in zip(each, _nll(model, self.data.target, self.pad, k)):
                figures["logprob_gain"] = (self._target_nll[0] - nll) / n
        for figures, vectors, generated in zip(each, settings, self._generation_figures(model, k)):
            if "activation_shift" in self.data.scorers and vectors is not None:
                figures["activation_shift"] = self.activation_shift(vectors)
            figures.update(generated)
        keys = [*COSTS, *self.data.scorers, "replies"]
        return [{key: f[key] for key in keys if key in f} for f in each]

    def measure(self, model: PreTrainedModel, vectors: VectorSet | None = None) -> dict[str, Any]:
        """Every figure for ``model`` (the base steered by ``vectors`` through hooks, or a baked checkpoint)."""
        return self.measure_each(model, [vectors])[0]


# Scorers of generated replies: each builds its function of the reply texts from the evaluation data.
TEXT_SCORERS: dict[str, Callable[[EvalData], Callable[[list[str]], float]]] = {
    "wordlist": lambda data: lambda texts: word_rate(texts, data.words),
    "vader": lambda data: vader_scorer(),
    "toxicity": lambda data: toxicity_scorer(),
    "classifier": lambda data: classifier_scorer(*data.classifier),
    "length": lambda data: reply_length,
}
# Cost columns of every table, before the effects (in the recipe's scorer order).
COSTS = ("kl", "perplexity", "repetition")
