"""The maths of each steering method, on mean activations (``Moments``).

Notation: for a set of texts S, μ(S) is the mean residual activation at the
site over every counted token of every text in S; c is the coefficient. The
result is the vector *added* to the residual stream, in float64.

- ``mean-centred`` (default; Jorgensen et al., 2023): v = c · (μ(target) − μ(background)).
  Subtracting the background mean removes the large offset every activation
  shares, leaving the direction specific to the target behaviour.
- ``mean`` (uncentred, for comparison): v = c · μ(target).
- ``actadd`` (Turner et al., 2023): v = c · (μ(positive prompt) − μ(negative prompt)),
  one prompt each. ActAdd adds the per-position difference at the first
  positions; a bias acts at every position, so each prompt is averaged over its tokens.
- ``contrast`` (CAA-style): v = c · (μ(positive texts) − μ(negative texts)).
"""

from __future__ import annotations

import torch

from bake.collection.activations import Moments

# Which text sets each method measures, in formula order: (minuend, subtrahend) or (mean,).
ROLES: dict[str, tuple[str, ...]] = {
    "mean-centred": ("target", "background"),
    "mean": ("target",),
    "actadd": ("positive", "negative"),
    "contrast": ("positive", "negative"),
}


def steering_vector(method: str, sets: dict[str, Moments], coefficient: float) -> torch.Tensor:
    """v = c · μ(first role), minus μ(second role) when the method has one (see module doc)."""
    first, *rest = ROLES[method]
    v = sets[first].mean.clone()
    for role in rest:
        v -= sets[role].mean
    return coefficient * v
