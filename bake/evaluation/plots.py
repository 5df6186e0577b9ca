"""PNG plots of sweeps and method comparisons (matplotlib's object API on the Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from bake.errors import BakeError
from bake.recipe import LABELS


def require() -> None:
    """Refuse before any work when plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BakeError("plots need matplotlib: pip install 'bake[eval]'")


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional
    from matplotlib.figure import Figure  # optional

    fig = Figure(figsize=(5.6 * ncols, 4.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _budget(ax, max_kl: float | None, vertical: bool = True) -> None:
    if max_kl is not None:
        (ax.axvline if vertical else ax.axhline)(max_kl, ls="--", color="grey", lw=1, label=f"KL budget {max_kl:g}")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def sweep_plots(rows: list[dict[str, Any]], base: dict[str, Any], effect: str, max_kl: float | None, folder: Path) -> list[Path]:
    """effect_vs_kl.png (one line per layer, from the base at KL 0) and coefficient.png (effect and KL vs coefficient)."""
    layers = sorted({r["layer"] for r in rows})
    fig, (ax,) = _figure(1)
    for layer in layers:
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coefficient"])
        start = [(0.0, base[effect])] if base.get(effect) is not None else []
        points = start + [(r["kl"], r[effect]) for r in mine if r[effect] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"layer {layer}")
        for r in mine:
            if r[effect] is not None:
                ax.annotate(f"{r['coefficient']:g}", (r["kl"], r[effect]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    _budget(ax, max_kl)
    ax.set(xlabel=LABELS["kl"], ylabel=LABELS.get(effect, effect), title=f"{effect} vs KL (labels: coefficient)")
    ax.legend(fontsize=8)
    paths = [_save(fig, folder / "effect_vs_kl.png")]

    fig, (left, right) = _figure(2)
    for layer in layers:
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coefficient"])
        left.plot([r["coefficient"] for r in mine], [r[effect] for r in mine], marker="o", label=f"layer {layer}")
        right.plot([r["coefficient"] for r in mine], [r["kl"] for r in mine], marker="o", label=f"layer {layer}")
    if base.get(effect) is not None:
        left.axhline(base[effect], color="black", lw=1, label="base")
    _budget(right, max_kl, vertical=False)
    left.set(xlabel="coefficient", ylabel=LABELS.get(effect, effect), title=f"{effect} vs coefficient")
    right.set(xlabel="coefficient", ylabel=LABELS["kl"], title="KL vs coefficient")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    paths.append(_save(fig, folder / "coefficient.png"))
    return paths


def compare_plot(curves: dict[str, list[dict[str, Any]]], base: dict[str, Any], effect: str, max_kl: float, path: Path) -> Path:
    """Left: effect vs KL for each method up to the budget; right: each method's effect at the budget."""
    fig, (left, right) = _figure(2)
    methods = list(curves)
    for method, rows in curves.items():
        start = [(0.0, base[effect])] if base.get(effect) is not None else []
        points = start + [(r["kl"], r[effect]) for r in rows if r[effect] is not None]
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    _budget(left, max_kl)
    left.set(xlabel=LABELS["kl"], ylabel=LABELS.get(effect, effect), title=f"{effect} vs KL")
    left.legend(fontsize=8)
    at_budget = [curves[m][-1][effect] or 0.0 for m in methods]
    right.bar(methods, at_budget, color=[f"C{i}" for i in range(len(methods))])
    if base.get(effect) is not None:
        right.axhline(base[effect], color="black", lw=1, label="base")
        right.legend(fontsize=8)
    right.set(ylabel=LABELS.get(effect, effect), title=f"{effect} at KL ≤ {max_kl:g}")
    right.tick_params(axis="x", labelsize=8)
    return _save(fig, path)
