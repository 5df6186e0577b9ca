"""Sampling a background with llama.cpp straight from the GGUF (llama-cpp-python), the fast engine on a CPU.

transformers' ``generate`` on the dequantized float32 model is most of a first run; llama.cpp multiplies the
quantized blocks directly and decodes all sequences of a batch in one call. The sampler is bake's own, not
llama.cpp's chain (whose defaults add top-k 40, top-p 0.95 and min-p 0.05): plain temperature sampling from
softmax(logits / T), what transformers did with ``top_k=0, top_p=1``. Each sequence draws from its own numpy
generator seeded by (seed, index), so the draws do not depend on which sequences share a batch; the logits are
llama.cpp's, deterministic for a fixed batch layout (``BATCH``), which is why the layout is fixed. The thread count
does not change them (measured: the same samples from 1, 2 and 4 threads), so it is chosen by speed (``_Threads``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bake.errors import BakeError

BATCH = 32
"""Sequences decoded together (the KV cache holds BATCH x tokens positions)."""
INSTALL = "pip install 'bake[llama-cpp]'"
TRIAL_STEPS = 3
"""Decoding steps timed per thread count at the start of a ``sample`` call (the choice then holds for all its
batches)."""


class _Threads:
    """The thread count to decode with, measured on the first steps: half the cores for ``TRIAL_STEPS`` steps, then
    every core for as many, stopped at the first step slower than half the cores' median; the faster count is kept.
    ggml's threads spin at every barrier: on an idle 2-core machine two threads decoded 1.4x faster than one, on a
    busy one 6x slower (load 13)."""

    def __init__(self, ctx: object) -> None:
        import llama_cpp  # optional

        self.ctx, self.set = ctx, llama_cpp.llama_set_n_threads
        cpus = len(os.sched_getaffinity(0))
        self.trials = list(dict.fromkeys([max(1, cpus // 2), cpus]))
        self.times: dict[int, list[float]] = {n: [] for n in self.trials}
        self.chosen: int | None = None if len(self.trials) > 1 else cpus

    def decode(self, decode: Callable[[], int]) -> int:
        """``decode()`` with the thread count on trial, or the chosen one; its return value."""
        if self.chosen is not None:
            return decode()
        n = next(n for n in self.trials if len(self.times[n]) < TRIAL_STEPS)
        self.set(self.ctx, n, n)
        start = time.perf_counter()
        result = decode()
        self.times[n].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in self.times.items() if len(v) == TRIAL_STEPS}
        fewer, more = self.trials
        if n == more and (self.times[more][-1] > median[fewer] or len(self.times[more]) == TRIAL_STEPS):
            self.chosen = min(median, key=median.get) if self.times[more][-1] <= median[fewer] else fewer
            self.set(self.ctx, self.chosen, self.chosen)
        return result


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def sample(
    gguf: Path, start: int, stops: set[int], sequences: int, tokens: int, temperature: float, seed: int
) -> list[list[int]]:
    """``sequences`` token lists of at most ``tokens`` ids from ``start``, each cut before its first stop token."""
    try:
        import llama_cpp  # optional
    except ImportError:
        raise BakeError(f"sampling with llama.cpp needs llama-cpp-python: {INSTALL}") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its loader logs every tensor to stderr
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise BakeError(f"llama.cpp cannot load {str(gguf)!r}: give a background corpus")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = BATCH * tokens
    params.n_batch = params.n_ubatch = BATCH
    params.n_seq_max = BATCH
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = len(os.sched_getaffinity(0))
    ctx = llama_cpp.llama_init_from_model(model, params)
    threads = _Threads(ctx)
    batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out: list[list[int]] = []
    try:
        for first in range(0, sequences, BATCH):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            rows = range(first, min(first + BATCH, sequences))
            rngs = {i: np.random.default_rng([seed, i]) for i in rows}
            seqs = {i: [start] for i in rows}
            live = list(rows)
            for pos in range(tokens - 1):
                if not live:
                    break
                batch.n_tokens = len(live)
                for j, i in enumerate(live):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = seqs[i][-1], pos, 1
                    batch.seq_id[j][0], batch.logits[j] = i - first, 1
                if threads.decode(lambda: llama_cpp.llama_decode(ctx, batch)) != 0:
                    raise BakeError("llama.cpp failed to decode while sampling: give a background corpus")
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(live), n_vocab))
                z = logits.astype(np.float64) / temperature
                cdf = np.cumsum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)
                ended = set()
                for j, i in enumerate(live):
                    u = rngs[i].random() * cdf[j, -1]
                    token = int(min(np.searchsorted(cdf[j], u, side="right"), n_vocab - 1))
                    if token in stops:
                        ended.add(i)
                    else:
                        seqs[i].append(token)
                live = [i for i in live if i not in ended]
            out += [seqs[i] for i in rows]
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return out
