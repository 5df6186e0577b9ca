"""Collection benchmark: the common full forward with output_hidden_states vs bake's truncated model."""

from __future__ import annotations

import statistics

from common import SMOLLM2, case, f, log, med, table

TITLE = "Collection: mean residual after block L"


def collection(args) -> dict:
    """Both ways at an early, a middle and a late block of SmolLM2 and of a synthetic 1.2B Llama, alternating."""
    quick = args.quick
    synthetic = case(kind="checkpoint", name="llama-1b-quick" if quick else "llama-1b", cache=str(args.cache))["path"]
    models = [
        ("SmolLM2-135M-Instruct", SMOLLM2, "float32", 512 if quick else 4096),
        ("synthetic Llama " + ("(quick)" if quick else "1.2B"), synthetic, "bfloat16", 512 if quick else 2048),
    ]
    repeat = args.repeat or (1 if quick else 3)
    rows = []
    for label, model, dtype, tokens in models:
        n_layers = case(kind="depth", model=model)["layers"]
        for layer in sorted({n_layers // 8, n_layers // 2, n_layers - 2}):
            runs: dict[str, list[dict]] = {"common": [], "bake": []}
            for r in range(repeat):
                for way in ("common", "bake") if r % 2 == 0 else ("bake", "common"):
                    log(f"[collection] {label} L={layer} {way} run {r + 1}/{repeat}")
                    runs[way].append(
                        case(
                            kind="collect",
                            model=model,
                            dtype=dtype,
                            tokens=tokens,
                            layer=layer,
                            way=way,
                            batch_tokens=4096,
                        )
                    )
            mean_c, mean_b = runs["common"][0]["mean"], runs["bake"][0]["mean"]
            diff = max(abs(x - y) for x, y in zip(mean_c, mean_b)) / max(abs(x) for x in mean_c)
            if diff > 1e-3:
                raise SystemExit(
                    f"{label} L={layer}: the two ways' means differ by {diff:.2e} of max|mean|: the comparison is not "
                    "like for like"
                )
            ways = {
                w: {
                    "tokens_per_s": statistics.median(run["tokens"] / run["forward_s"] for run in rs),
                    "load_forward_s": statistics.median(run["load_s"] + run["forward_s"] for run in rs),
                    "peak_rss_mb": med(rs, "peak_rss_mb"),
                }
                for w, rs in runs.items()
            }
            c, b = ways["common"], ways["bake"]
            rows.append(
                {
                    "model": label,
                    "dtype": dtype,
                    "tokens": runs["common"][0]["tokens"],
                    "layer": layer,
                    "layers": n_layers,
                    **ways,
                    "speed_ratio": b["tokens_per_s"] / c["tokens_per_s"],
                    "time_ratio": b["load_forward_s"] / c["load_forward_s"],
                    "rss_ratio": b["peak_rss_mb"] / c["peak_rss_mb"],
                    "mean_diff": diff,
                }
            )
    return {"repeat": repeat, "rows": rows}


def render_collection(results: dict) -> str:
    rows = [
        [
            f"{r['model']} ({r['dtype']}, {r['tokens']} tokens)",
            r["layer"],
            f"{r['layer'] + 1}/{r['layers']}",
            f(r["common"]["tokens_per_s"]),
            f(r["bake"]["tokens_per_s"]),
            f"**{r['speed_ratio']:.2f}×**",
            f"{r['common']['load_forward_s']:.1f}",
            f"{r['bake']['load_forward_s']:.1f}",
            f"{r['time_ratio']:.2f}×",
            f"{r['common']['peak_rss_mb']:.0f}",
            f"{r['bake']['peak_rss_mb']:.0f}",
            f"**{r['rss_ratio']:.2f}×**",
            f"{r['mean_diff']:.0e}",
        ]
        for r in results["rows"]
    ]
    header = [
        "model",
        "L",
        "blocks (L+1)/N",
        "tokens/s common",
        "tokens/s bake",
        "bake ÷ common",
        "load+forward s common",
        "load+forward s bake",
        "bake ÷ common",
        "peak RSS MB common",
        "peak RSS MB bake",
        "bake ÷ common",
        "max abs Δmean / max abs mean",
    ]
    return (
        "Real text (the quickstart's cheerful replies, repeated to the token count), SmolLM2's tokenizer, batches of "
        "at most 4096 padded tokens sorted by length, the same batches both ways; `use_cache=False` both ways. "
        "**common**: the whole model, `model(..., output_hidden_states=True)`, keep `hidden_states[L+1]` (as repeng "
        "does). **bake**: `load_model(path, layers=L+1)` + `bake.activations.collect`. Late L is N-2, not N-1: "
        "transformers returns the last hidden state after the final norm. Each case in a fresh process; median of "
        f"{results['repeat']} run(s), ways alternating. tokens/s counts the forward loop only; load + forward is what "
        "the user waits for after start-up. Both ways' means are checked equal.\n\n" + table(header, rows)
    )
