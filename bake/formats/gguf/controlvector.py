"""Import control vectors (repeng, llama.cpp) from GGUF into a bake vector file.

The file layout
---------------
A control-vector GGUF has ``general.architecture = "controlvector"``, the keys
``controlvector.model_hint`` (the model_type it was made for) and
``controlvector.layer_count`` (how many directions it holds, not the model's depth),
and one 1-D F32 tensor ``direction.N`` per steered layer. Writers: repeng
``ControlVector.export_gguf`` (vgel/repeng@0ba7196, repeng/extract.py:125-146,
arch at :137, model_hint :139, layer_count :140, ``direction.{layer}`` :142) and
llama.cpp's ``llama-cvector-generator`` (tools/cvector-generator/cvector-generator.cpp,
``export_gguf``).

The layer-index convention: ``direction.N`` is bake's ``layer.N``
-----------------------------------------------------------------
``direction.N`` is added to the residual stream at the OUTPUT of 0-based block N,
i.e. exactly bake's ``layer.N`` (site ``resid_post``), multiplied by the file's scale.
Sources (llama.cpp read through the file index, since the repository snapshot is
over the fetch size limit; the commit each file was read at is given):

* Loading, ggml-org/llama.cpp common/common.cpp (commit 00758e06; an 82 kB file read
  through the index, so cited by function and message rather than line),
  ``common_control_vector_load_one``: a tensor name must be ``direction.<int>``;
  an unparsable index is an error ("invalid/unparsable direction tensor layer
  index") and index 0 is refused ("invalid (zero) direction tensor layer index");
  the tensor must be F32 ("invalid (non-F32)") and 1-D ("invalid (non-1D)"), all of
  one size. ``direction.N`` is accumulated into a flat buffer at offset
  ``n_embd * (N - 1)`` ("layer 1 at [0]") as ``dst += src * strength``, so two
  tensors for the same layer add. ``common_control_vector_load`` then adds the
  buffers of all files element-wise ("extend if necessary"): several files add up.
* The scale: common/arg.cpp (option table, found by text search in the index, no
  line numbers), ``--control-vector FNAME`` pushes ``{1.0f, fname}``
  (strength 1) and ``--control-vector-scaled FNAME SCALE`` pushes
  ``{std::stof(scale), fname}``; repeated options add files. ``--control-vector-layer-range
  START END`` (inclusive) only restricts which blocks get their vector;
  ``common_init_from_params`` (common.cpp) defaults it to ``1 .. llama_model_n_layer``,
  i.e. every block that can have one.
* Back to layers, src/llama-adapter.cpp (commit 0650ea8c): ``init`` pushes a null
  tensor for il = 0 (:65 "there's never a tensor for layer 0") then one per
  il = 1 .. n_layer-1 (:66); ``apply`` copies buffer offset ``n_embd * (il - 1)``
  into ``tensors[il]`` (:124-130, offset at :127; a size mismatch with the model
  is refused at :110). Offset ``n_embd*(N-1)`` at load and ``n_embd*(il-1)`` here
  cancel: ``direction.N`` lands in ``tensors[N]``. Indices >= n_layer are never
  copied (silently dropped; bake refuses them at fold time instead).
  ``tensor_for(il)`` (:14-20) returns ``tensors[il]`` when
  ``layer_start <= il <= layer_end``, and ``apply_to(ctx, cur, il)`` (:22-29) does
  ``cur = ggml_add(cur, tensors[il])``.
* Where it is applied, src/models/llama.cpp (commit 069be0ae; the Llama graph, the
  one read here): inside ``for (int il = 0; il < n_layer; ++il)`` (:125), after the
  FFN residual add ``cur = ggml_add(ctx0, cur, ffn_inp)`` (:227) comes
  ``cur = build_cvec(cur, il)`` (:230), named ``l_out`` (:231) and fed to the next
  block (:234). ``llm_graph_context::build_cvec`` (src/llama-graph.cpp) is
  ``return cvec->apply_to(ctx0, cur, il)``. So tensors[il] is added to block il's
  output: ``direction.N`` -> after 0-based block N.
* repeng agrees: ``ControlModel`` wraps ``model_layer_list(model)[i]``
  (``model.layers`` / ``transformer.h``, repeng/control.py:31-35, :207-215) and
  ``ControlModule.forward`` adds the control to the wrapped block's output
  (:149-150, :186; ``set_control`` multiplies by ``coeff``, :76-79). Directions are
  read from ``out.hidden_states[layer + 1]`` (repeng/extract.py:382-384), the output
  of block ``layer`` (``hidden_states[0]`` is the embeddings), after negative
  indices are normalised to ``n_layers + i`` (:277-278; the default layers are
  ``range(-1, -num_hidden_layers, -1)``, :274, i.e. blocks n-1 .. 1, never 0), and
  exported under that same index (:142).

Note that llama.cpp's own ``llama-cvector-generator`` measures direction i+1 on
``l_out`` of block i (it collects the ``l_out`` tensors, drops the last, and
names output i ``direction.{i+1}``: tools/cvector-generator/mean.hpp ``run``), so its
vectors are *measured* one block earlier than llama.cpp *adds* them. bake
reproduces what llama.cpp does with a file (add ``direction.N`` after block N),
not where it was measured, so a baked checkpoint behaves like llama.cpp steered
with the same file and scale.

Importing refuses what llama.cpp refuses (other tensor names, index 0, non-1-D)
plus non-finite values and GGUFs of another architecture; F16 / F64 directions are
accepted and converted to float32.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bake.errors import BakeError
from bake.gguffile import gguf_value, read_gguf
from bake.sources.resolve import sha256_file
from bake.vectorfile import VectorSet, tensor_name

ARCHITECTURE = "controlvector"
CONVENTION = (
    "GGUF direction.N -> layer.N: added to the residual stream after 0-based block N, times scale "
    "(llama.cpp adds direction.N to block N's output l_out; repeng to model.layers[N]'s output)"
)
_DIRECTION = re.compile(r"^direction\.(\d+)$")
_FLOAT_TYPES = ("F32", "F16", "F64")


def _read_one(path: Path, scale: float) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """The directions of one file as float64 arrays {N: direction * scale}, and its provenance."""
    where = repr(str(path))
    if not path.is_file():
        raise BakeError(f"control vector file {where} not found: check the path")
    reader = read_gguf(path, "pass a control-vector .gguf")
    arch = gguf_value(reader, "general.architecture")
    if arch != ARCHITECTURE:
        what = f"a GGUF of architecture {arch!r}" if arch else "a GGUF without general.architecture"
        raise BakeError(
            f"{where} is {what}, not a control vector (general.architecture {ARCHITECTURE!r}): pass a file written by "
            "repeng's export_gguf or llama-cvector-generator (a model GGUF goes to bake fold as MODEL)"
        )
    if not reader.tensors:
        raise BakeError(f"{where} holds no direction.N tensors: export the control vector again")
    directions: dict[int, np.ndarray] = {}
    size = None
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if not m:
            raise BakeError(
                f"{where}: tensor {t.name!r} is not named direction.N (N a layer number): remove or rename it"
            )
        layer = int(m[1])
        if layer == 0:
            raise BakeError(
                f"{where}: {t.name} has layer index 0, which llama.cpp refuses (it never steers block 0's output): "
                "remove that tensor, or steer block 0 with a bake recipe"
            )
        kind = t.tensor_type.name
        if kind not in _FLOAT_TYPES:
            raise BakeError(f"{where}: {t.name} is {kind}, not a float tensor: export it as F32")
        dims = [int(d) for d in t.shape]
        if any(d != 1 for d in dims[1:]):  # ggml's n_dims: trailing dimensions of 1 do not count
            raise BakeError(f"{where}: {t.name} has shape {dims}, not a 1-D vector: export one vector per layer")
        data = np.asarray(t.data, dtype=np.float64).reshape(-1)
        if size is None:
            size = data.size
        elif data.size != size:
            raise BakeError(
                f"{where}: {t.name} has {data.size} values but other directions have {size}: one file is for one model"
            )
        scaled = data * scale
        if not np.isfinite(scaled).all():
            raise BakeError(f"{where}: {t.name} times scale {scale:g} contains NaN or inf: fix the file or the scale")
        directions[layer] = directions.get(layer, 0.0) + scaled  # llama.cpp adds repeated layers too
    layer_count = gguf_value(reader, f"{ARCHITECTURE}.layer_count")
    info = {
        "file": path.name,
        "sha256": sha256_file(path),
        "model_hint": gguf_value(reader, f"{ARCHITECTURE}.model_hint"),
        "layer_count": layer_count if isinstance(layer_count, int) else None,
        "scale": scale,
        "directions": sorted(directions),
        "hidden_size": size,
    }
    return directions, info


def _scales(n: int, scale: float | Sequence[float]) -> list[float]:
    scales = [float(scale)] if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if not scales:
        scales = [1.0]
    if len(scales) == 1:
        scales *= n
    if len(scales) != n:
        raise BakeError(f"{len(scales)} scales for {n} files: give one scale for all files, or one per file in order")
    for s in scales:
        if not math.isfinite(s) or s == 0:
            raise BakeError(
                f"scale {s:g} would make the vectors {'zero' if s == 0 else 'non-finite'}: give a non-zero finite scale"
            )
    return scales


def read_control_vector(path: str | Path | Sequence[str | Path], scale: float | Sequence[float] = 1.0) -> VectorSet:
    """Read one control-vector GGUF, or several that add up, as a bake ``VectorSet``.

    ``direction.N`` becomes ``layer.N`` (added after 0-based block N, as llama.cpp
    applies it), multiplied by ``scale`` (llama.cpp's ``--control-vector-scaled``;
    negative flips the direction). ``scale`` is one number for every file or one
    per file. Sums are taken in float64, then stored as float32.
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise BakeError("no control vector files given: pass at least one .gguf")
    scales = _scales(len(paths), scale)
    total: dict[int, np.ndarray] = {}
    files = []
    for p, s in zip(paths, scales):
        directions, info = _read_one(p, s)
        if files and info["hidden_size"] != files[0]["hidden_size"]:
            raise BakeError(
                f"{str(p)!r} has vectors of size {info['hidden_size']} but {files[0]['file']!r} has "
                f"{files[0]['hidden_size']}: combine files made for the same model"
            )
        for layer, v in directions.items():
            total[layer] = total.get(layer, 0.0) + v
        files.append(info)
    hints = sorted({f["model_hint"] for f in files if f["model_hint"]})
    try:
        gguf_version = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        gguf_version = "unknown"
    meta = {
        "format": "bake-vectors/1",
        "source": "control-vector-gguf",
        "convention": CONVENTION,
        "model_hint": hints[0] if len(hints) == 1 else (hints or None),
        "hidden_size": files[0]["hidden_size"],
        "control_vectors": files,
        "norms": {tensor_name(layer, "resid_post"): float(np.linalg.norm(v)) for layer, v in sorted(total.items())},
        "versions": {"gguf": gguf_version},
    }
    vectors = {(layer, "resid_post"): torch.from_numpy(v.astype(np.float32)) for layer, v in total.items()}
    return VectorSet(vectors, meta)


def describe(vectors: VectorSet) -> str:
    """One line per imported vector: which tensor, its norm, and the files it came from."""
    files = vectors.meta.get("control_vectors", [])
    lines = [f"{'tensor':<10} {'norm':>9}  from"]
    for (layer, site), v in sorted(vectors.vectors.items()):
        src = ", ".join(f"{f['file']} direction.{layer} x{f['scale']:g}" for f in files if layer in f["directions"])
        lines.append(f"{tensor_name(layer, site):<10} {float(v.norm()):>9.4g}  {src}")
    return "\n".join(lines)
