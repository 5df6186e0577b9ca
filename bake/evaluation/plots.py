"""PNG plots of sweeps and method comparisons (matplotlib's object API on the Agg canvas: no display, no pyplot
state)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bake.errors import BakeError
from bake.recipe import LABELS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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


def _budget(ax: Axes, max_kl: float | None, vertical: bool = True) -> None:
    if max_kl is not None:
        (ax.axvline if vertical else ax.axhline)(max_kl, ls="--", color="grey", lw=1, label=f"KL budget {max_kl:g}")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _over_budget(ax: Axes, points: list[tuple[float, float, float]], max_kl: float | None, label: bool) -> None:
    """Ring the (x, y, kl) points whose KL is over the budget (coefficient: auto and compare never pick them)."""
    over = [p for p in points if max_kl is not None and p[2] > max_kl]
    if over:
        ax.scatter(
            [p[0] for p in over],
            [p[1] for p in over],
            s=90,
            facecolors="none",
            edgecolors="red",
            zorder=3,
            label="over the KL budget" if label else None,
        )


def sweep_figures(rows: list[dict[str, Any]], base: dict[str, Any], effect: str, max_kl: float | None) -> list:
    """The effect-vs-KL figure (one line per layer, from the base at KL 0) and the effect/KL-vs-coefficient figure."""
    layers = sorted({r["layer"] for r in rows})
    label = LABELS.get(effect, effect)
    has_base = base.get(effect) is not None
    fig, (ax,) = _figure(1)
    for i, layer in enumerate(layers):
        mine = sorted(
            (r for r in rows if r["layer"] == layer and r[effect] is not None), key=lambda r: r["coefficient"]
        )
        start = [(0.0, base[effect])] if has_base else []
        points = start + [(r["kl"], r[effect]) for r in mine]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"layer {layer}")
        for r in mine:
            ax.annotate(
                f"{r['coefficient']:g}", (r["kl"], r[effect]), textcoords="offset points", xytext=(3, 3), fontsize=7
            )
        _over_budget(ax, [(r["kl"], r[effect], r["kl"]) for r in mine], max_kl, label=i == 0)
    if has_base:  # the base is every line's KL-0 point; a dotted line across the plot shows where steering starts
        ax.axhline(base[effect], color="black", ls=":", lw=1, label="base")
        ax.plot([0.0], [base[effect]], marker="s", color="black", ls="none", zorder=3)
        ax.annotate("base", (0.0, base[effect]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    _budget(ax, max_kl)
    ax.set(xlabel=LABELS["kl"], ylabel=label, title=f"{label} vs KL (point labels: coefficient)")
    ax.legend(fontsize=8)
    figures = [fig]

    fig, (left, right) = _figure(2)
    for i, layer in enumerate(layers):  # coefficient 0 is the base: KL 0 and the base's effect
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coefficient"])
        effects = ([(0.0, base[effect], 0.0)] if has_base else []) + [
            (r["coefficient"], r[effect], r["kl"]) for r in mine if r[effect] is not None
        ]
        kls = [(0.0, 0.0, 0.0)] + [(r["coefficient"], r["kl"], r["kl"]) for r in mine]
        left.plot([p[0] for p in effects], [p[1] for p in effects], marker="o", label=f"layer {layer}")
        right.plot([p[0] for p in kls], [p[1] for p in kls], marker="o", label=f"layer {layer}")
        _over_budget(left, effects, max_kl, label=i == 0)
        _over_budget(right, kls, max_kl, label=i == 0)
    if has_base:
        left.axhline(base[effect], color="black", ls=":", lw=1, label="base (coefficient 0)")
    _budget(right, max_kl, vertical=False)
    left.set(xlabel="coefficient", ylabel=label, title=f"{label} vs coefficient")
    right.set(xlabel="coefficient", ylabel=LABELS["kl"], title="KL vs coefficient")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figures.append(fig)
    return figures


def sweep_plots(
    rows: list[dict[str, Any]], base: dict[str, Any], effect: str, max_kl: float | None, folder: Path
) -> list[Path]:
    """effect_vs_kl.png and coefficient.png (see ``sweep_figures``)."""
    figures = sweep_figures(rows, base, effect, max_kl)
    return [_save(fig, folder / name) for fig, name in zip(figures, ("effect_vs_kl.png", "coefficient.png"))]


def compare_plot(
    curves: dict[str, list[dict[str, Any]]], base: dict[str, Any], effect: str, max_kl: float, path: Path
) -> Path:
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
