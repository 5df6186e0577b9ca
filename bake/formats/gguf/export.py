"""Bake steering vectors straight into a GGUF file for llama.cpp and Ollama, keeping its quantization.

llama.cpp's control vectors need run-time flags and Ollama has none; a bias tensor
inside the file needs nothing. The output is the input file with

- the header's tensor and key counts updated (the only original bytes that change);
- every original metadata entry and tensor description copied byte for byte, in the
  same order, then ``bake.*`` metadata: ``bake.manifest`` (JSON: what was baked from
  what, and sha256 digests of everything copied), ``bake.vector.<layer.L[.mid]>`` (the
  vectors, float32 arrays), ``bake.original.<tensor>`` (a bias the file already had)
  and ``bake.verification`` (JSON, space-padded to a fixed size and filled in after
  the checks, so writing it moves nothing);
- one F32 tensor description per new bias;
- the original data section byte for byte at the same alignment and relative offsets
  (quantized blocks are never decoded), then the new biases' float32 data.

A bias goes where llama.cpp's loader for the file's architecture takes it
(``bake.families.gguf``). Where the file already has that bias (GPT-2, BLOOM...)
it is overwritten in place with old + vector, computed in float32, and the old value
is kept in the metadata. ``check`` recomputes all of it from the file alone, which is
what ``bake inspect FILE.gguf`` reports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from bake.checkpoint import check_output, staged_output
from bake.errors import BakeError
from bake.families.gguf import LLAMA_CPP, bias_name, lookup
from bake.families.hf import Site
from bake.formats.base import BakeResult
from bake.formats.gguf import llamacpp
from bake.gguffile import gguf_value, is_gguf, read_gguf
from bake.manifest import (
    BiasRecord,
    GGUFBase,
    GGUFCopied,
    GGUFManifest,
    RecipeRecord,
    dumps,
    package_versions,
    validate,
)
from bake.recipe import Recipe, VerifySpec
from bake.sources.resolve import package_file, resolve_model, sha256_file
from bake.vectorfile import VectorSet, tensor_name

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField

MANIFEST_KEY = "bake.manifest"
VERIFICATION_KEY = "bake.verification"
VECTOR_KEY = "bake.vector."
ORIGINAL_KEY = "bake.original."
_VERIFICATION_BYTES = 4096
_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor count, key count (GGUF v2 and v3)
_PKG = re.compile(r"^pkg:[A-Za-z_]\w*/.+$")
_COPY_CHUNK = 1 << 24


# --- reading ---------------------------------------------------------------------------------


def gguf_file(spec: str, base_dir: Path | None = None) -> Path:
    """The GGUF file a model spec names (a path, or ``pkg:PACKAGE/FILE.gguf``), without dequantizing it."""
    if _PKG.match(spec):
        path = package_file(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
    if not is_gguf(path):
        raise BakeError(f"model {spec!r} is not a .gguf file: GGUF output adds biases to a GGUF base model")
    if not path.is_file():
        raise BakeError(f"GGUF file {spec!r} not found: check the path")
    return path


def _kv_fields(reader: GGUFReader) -> list:
    """The file's own key-value entries in file order (the reader lists the header counts as fields too)."""
    return list(reader.fields.values())[3:]


def _end(f: ReaderField) -> int:
    return f.offset + sum(int(p.nbytes) for p in f.parts)


# --- what to write -----------------------------------------------------------------------------


@dataclass
class _Bias:
    """One bias to write: for which vector, where, and its value."""

    vector: str
    layer: int
    site: Site
    tensor: str
    scale: float
    norm: float
    original: np.ndarray | None
    value: np.ndarray


def bias_value(original: np.ndarray | None, vector: np.ndarray, scale: float) -> np.ndarray:
    """What a bias holds: the original bias (or zero) plus vector / scale, in float32 (as the HF fold computes it)."""
    v = torch.from_numpy(np.array(vector, dtype=np.float32))
    before = torch.zeros_like(v) if original is None else torch.from_numpy(np.array(original, dtype=np.float32))
    return (before + (v / scale if scale != 1.0 else v)).numpy()


def _refuse_steered(reader: GGUFReader, where: str) -> None:
    if reader.fields.get(MANIFEST_KEY) is not None:
        raise BakeError(
            f"{where} already carries bake steering: bake the original GGUF instead (stacking is not supported)"
        )


def check_points(model: str, points: list[tuple[int, Site]], base_dir: Path | None = None) -> None:
    """Refuse (layer, site) points the GGUF cannot carry, before any vector is computed."""
    source = gguf_file(model, base_dir)
    reader = read_gguf(source)
    where = repr(str(source))
    _refuse_steered(reader, where)
    arch = gguf_value(reader, "general.architecture")
    lookup(arch, where)
    blocks = gguf_value(reader, f"{arch}.block_count")
    for layer, site in points:
        if not 0 <= layer < blocks:
            raise BakeError(
                f"{where}: layer {layer} is outside the model's blocks 0..{blocks - 1}: pick a layer in range"
            )
        bias_name(arch, layer, site, lambda key: gguf_value(reader, f"{arch}.{key}"), where)


def plan(reader: GGUFReader, vectors: VectorSet, where: str) -> tuple[str, list[_Bias]]:
    """Every bias to write for ``vectors``, checked against the file's architecture, size and depth."""
    _refuse_steered(reader, where)
    arch = gguf_value(reader, "general.architecture")
    entry = lookup(arch, where)
    hidden = gguf_value(reader, f"{arch}.embedding_length")
    vectors.check_model(hidden, gguf_value(reader, f"{arch}.block_count"), where)
    tensors = {t.name: t for t in reader.tensors}
    scale = float(gguf_value(reader, f"{arch}.{entry.scale}", 1.0)) if entry.scale else 1.0
    biases = []
    for (layer, site), v in sorted(vectors.vectors.items()):
        name = bias_name(arch, layer, site, lambda key: gguf_value(reader, f"{arch}.{key}"), where)
        existing = tensors.get(name)
        original = None
        if existing is not None:
            if existing.tensor_type.name != "F32" or int(existing.n_elements) != hidden:
                raise BakeError(
                    f"{where}: {name} is {existing.tensor_type.name} with {int(existing.n_elements)} values, "
                    f"not F32 with {hidden}: bake adds to F32 biases only"
                )
            original = np.array(existing.data, dtype=np.float32).reshape(-1)
        elif entry.always_present:
            raise BakeError(
                f"{where}: {name} is missing, but llama.cpp's {arch} loader requires it: the file is incomplete"
            )
        rescale = name.removesuffix(".bias") + ".scale"
        if rescale in tensors:  # multiplies that output after the bias (src/llama-graph.cpp:1955-1956)
            raise BakeError(
                f"{where}: {rescale} rescales the output after its bias: files with per-tensor scales "
                "(e.g. NVFP4) are not supported"
            )
        value = bias_value(original, v.numpy(), scale)
        if not np.isfinite(value).all():
            raise BakeError(f"{where}: {tensor_name(layer, site)} makes {name} non-finite: lower the coefficient")
        biases.append(_Bias(tensor_name(layer, site), layer, site, name, scale, float(v.norm()), original, value))
    return arch, biases


# --- writing ---------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_string(key: str, value: str) -> bytes:
    from gguf import GGUFValueType  # optional

    return _string(key) + struct.pack("<I", GGUFValueType.STRING) + _string(value)


def _kv_f32_array(key: str, values: np.ndarray) -> bytes:
    from gguf import GGUFValueType  # optional

    data = np.ascontiguousarray(values, dtype="<f4")
    return _string(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, data.size) + data.tobytes()


def _tensor_info(name: str, n: int, offset: int) -> bytes:
    from gguf import GGMLQuantizationType  # optional

    return _string(name) + struct.pack("<IQIQ", 1, n, GGMLQuantizationType.F32, offset)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _digests(reader: GGUFReader, kv_count: int, tensor_count: int, skip: set[str]) -> dict[str, str]:
    """sha256 of the original metadata entries, tensor descriptions and tensor data (the biases bake rewrote
    excepted)."""
    data = reader.data
    kvs = _kv_fields(reader)[:kv_count]
    infos = [t.field for t in reader.tensors[:tensor_count]]
    tensors = hashlib.sha256()
    for t in reader.tensors[:tensor_count]:
        if t.name not in skip:
            tensors.update(data[t.data_offset : t.data_offset + int(t.n_bytes)])
    return {
        "metadata_sha256": hashlib.sha256(data[_HEADER.size : _end(kvs[-1])] if kvs else b"").hexdigest(),
        "tensor_info_sha256": hashlib.sha256(data[infos[0].offset : _end(infos[-1])] if infos else b"").hexdigest(),
        "tensor_data_sha256": tensors.hexdigest(),
    }


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, end: int) -> None:
    src.seek(start)
    remaining = end - start
    while remaining:
        chunk = src.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise BakeError(f"{src.name!r} ended early: the GGUF file is truncated")
        out.write(chunk)
        remaining -= len(chunk)


def _write(
    source: Path, reader: GGUFReader, dst: Path, biases: list[_Bias], manifest: GGUFManifest, vectors: VectorSet
) -> int:
    """The layout in the module docstring; returns where the verification text starts."""
    kvs = _kv_fields(reader)
    kv_end = _end(kvs[-1]) if kvs else _HEADER.size
    info_end = _end(reader.tensors[-1].field) if reader.tensors else kv_end
    alignment = int(reader.alignment)
    data_size = source.stat().st_size - reader.data_offset
    new_kvs = [_kv_string(MANIFEST_KEY, dumps(manifest))]
    new_kvs += [_kv_f32_array(VECTOR_KEY + tensor_name(*p), v.numpy()) for p, v in sorted(vectors.vectors.items())]
    new_kvs += [_kv_f32_array(ORIGINAL_KEY + b.tensor, b.original) for b in biases if b.original is not None]
    new_kvs.append(_kv_string(VERIFICATION_KEY, "null".ljust(_VERIFICATION_BYTES)))
    verification_at = kv_end + sum(map(len, new_kvs)) - _VERIFICATION_BYTES
    added = [b for b in biases if b.original is None]
    offsets, offset = [], data_size + _pad(data_size, alignment)
    for b in added:
        offsets.append(offset)
        offset += b.value.nbytes + _pad(b.value.nbytes, alignment)
    magic, version = struct.unpack("<II", reader.data[:8].tobytes())
    tensors = {t.name: t for t in reader.tensors}
    with open(source, "rb") as src, open(dst, "wb") as out:
        out.write(_HEADER.pack(magic, version, len(reader.tensors) + len(added), len(kvs) + len(new_kvs)))
        _copy_range(src, out, _HEADER.size, kv_end)
        out.write(b"".join(new_kvs))
        _copy_range(src, out, kv_end, info_end)
        out.write(b"".join(_tensor_info(b.tensor, b.value.size, o) for b, o in zip(added, offsets)))
        out.write(b"\0" * _pad(out.tell(), alignment))
        data_start = out.tell()
        _copy_range(src, out, reader.data_offset, reader.data_offset + data_size)
        for b, o in zip(added, offsets):
            out.write(b"\0" * (data_start + o - out.tell()))
            out.write(b.value.astype("<f4").tobytes())
        for b in biases:
            if b.original is not None:  # same type and size: overwritten in place
                out.seek(data_start + tensors[b.tensor].data_offset - reader.data_offset)
                out.write(b.value.astype("<f4").tobytes())
    return verification_at


def _patch_verification(path: Path, at: int, report: dict[str, Any]) -> None:
    """Write the verification into its reserved, space-padded string (same length, so nothing moves)."""
    text = json.dumps(report, sort_keys=True).encode()
    if len(text) > _VERIFICATION_BYTES:
        raise AssertionError("verification report larger than its reserved space")
    with open(path, "r+b") as out:
        out.seek(at)
        out.write(text.ljust(_VERIFICATION_BYTES))


# --- checking a steered file (at write time and by bake inspect) -------------------------------


def read_manifest(path: str | Path) -> tuple[GGUFManifest, Any]:
    """The manifest of a steered GGUF (its verification included) and the open reader."""
    path = Path(path)
    if not path.is_file():
        raise BakeError(f"GGUF file {str(path)!r} not found: check the path")
    reader = read_gguf(path)
    if reader.fields.get(MANIFEST_KEY) is None:
        raise BakeError(
            f"{str(path)!r} has no {MANIFEST_KEY} metadata: it was not written by bake (or the entry was removed)"
        )
    try:
        manifest = json.loads(gguf_value(reader, MANIFEST_KEY))
        verification = json.loads(gguf_value(reader, VERIFICATION_KEY, "null"))
    except (json.JSONDecodeError, TypeError):
        raise BakeError(
            f"{str(path)!r}: {MANIFEST_KEY} or {VERIFICATION_KEY} is not valid JSON: the metadata was edited"
        ) from None
    if not isinstance(manifest, dict):
        raise BakeError(f"{str(path)!r}: {MANIFEST_KEY} is not a bake manifest: use --json to see it")
    typed = validate(manifest, f"{str(path)!r}: {MANIFEST_KEY}", GGUFManifest)
    typed.verification = verification
    return typed, reader


def is_steered_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF bake wrote (its metadata holds a bake manifest): what ``--force`` may replace."""
    try:
        return is_gguf(path) and path.is_file() and read_gguf(path).fields.get(MANIFEST_KEY) is not None
    except BakeError:
        return False


def _check_bias(b: BiasRecord, reader: GGUFReader, tensors: dict) -> str | None:
    t = tensors.get(b.tensor)
    vector = reader.fields.get(VECTOR_KEY + b.vector)
    original = reader.fields.get(ORIGINAL_KEY + b.tensor)
    if t is None:
        return f"{b.tensor} is missing from the tensors"
    if vector is None:
        return f"{VECTOR_KEY}{b.vector} is missing from the metadata"
    if b.had_bias and original is None:
        return f"the original value of {b.tensor} ({ORIGINAL_KEY}{b.tensor}) is missing from the metadata"
    if t.tensor_type.name != "F32":
        return f"{b.tensor} is {t.tensor_type.name}, baked as F32"
    before = np.array(original.contents(), dtype=np.float32) if b.had_bias else None
    expected = bias_value(before, np.array(vector.contents(), dtype=np.float32), b.scale)
    stored = np.array(t.data, dtype=np.float32).reshape(-1)
    if stored.shape != expected.shape:
        return f"{b.tensor} has {stored.size} values, baked with {expected.size}"
    if not np.array_equal(stored, expected):
        return (
            f"{b.tensor} differs from the baked value by up to {float(np.abs(stored - expected).max()):.3g}: it "
            "was changed after baking"
        )
    return None


def check(path: str | Path, manifest: GGUFManifest, reader: GGUFReader) -> list[str]:
    """Every way the file differs from what its manifest says was baked (empty: it matches).

    Recomputes each bias from the stored vector (and kept original) bit for bit, and the
    digests of every copied metadata entry, tensor description and tensor's data.
    """
    copied, biases = manifest.copied, manifest.biases
    kv_count, tensor_count = copied.kv_count, copied.tensor_count
    problems = []
    kvs = _kv_fields(reader)
    if len(kvs) < kv_count or any(not f.name.startswith("bake.") for f in kvs[kv_count:]):
        problems.append("metadata entries were added, removed or reordered after baking")
    extra = [t.name for t in reader.tensors[tensor_count:]]
    baked = [b.tensor for b in biases if not b.had_bias]
    if extra != baked:
        problems.append(f"the tensors after the original ones are {extra}, baked as {baked}")
    now = _digests(reader, kv_count, tensor_count, {b.tensor for b in biases if b.had_bias})
    labels = {
        "metadata_sha256": "original metadata entries",
        "tensor_info_sha256": "original tensor descriptions",
        "tensor_data_sha256": "original tensors' data",
    }
    problems += [
        f"the {label} changed after baking (sha256 {now[key][:12]}…, baked {str(getattr(copied, key))[:12]}…)"
        for key, label in labels.items()
        if now[key] != getattr(copied, key)
    ]
    tensors = {t.name: t for t in reader.tensors}
    problems += [p for p in (_check_bias(b, reader, tensors) for b in biases) if p]
    return problems


def describe(report: dict[str, Any]) -> str:
    """One line: what was checked and whether it passed."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    file = "matches" if not report["file_problems"] else "DOES NOT match"
    lcp = report["llama_cpp"]
    run = llamacpp.describe(lcp) if lcp else f"llama.cpp not run ({report['llama_cpp_skipped']})"
    return f"verification {verdict}: file {file} its manifest (original bytes, biases); {run}"


def inspect(path: str | Path) -> tuple[GGUFManifest, str, list[str]]:
    """``bake inspect FILE.gguf``: the manifest, a readable report, and the problems ``check`` found."""
    manifest, reader = read_manifest(path)
    problems = check(path, manifest, reader)
    base, biases = manifest.base, manifest.biases
    try:  # the entries and the verification report are the collection's and verify's dicts, not typed here
        entries = [
            f"  {e['name']}: layer {e['layer']} {e['site']}, {e['method']} x{e['coefficient']:g}, norm {e['norm']:.3f}"
            for e in manifest.entries
        ]  # a bare vector file has no entries
        verified = describe(manifest.verification) if manifest.verification else "verification: not recorded"
    except (KeyError, TypeError, AttributeError) as e:
        raise BakeError(
            f"{str(path)!r}: {MANIFEST_KEY} is not a complete bake manifest ({e.__class__.__name__}: {e}): "
            "use --json to see it"
        ) from None
    lines = [
        f"base: {base.base_model_id or base.file} (GGUF architecture {manifest.architecture}, "
        f"sha256 {base.sha256[:12]}…)",
        *entries,
        *(f"  {b.vector} -> {b.tensor}" + (" (added to the bias it had)" if b.had_bias else "") for b in biases),
        verified,
    ]
    lines.append(
        "loads in: llama.cpp (and Ollama, which runs it) with no flags; not in transformers, whose GGUF "
        "loader drops the biases (use the Hugging Face checkpoint there)"
    )
    lines.append("file: matches the manifest" if not problems else "file: DOES NOT match the manifest")
    lines += [f"  - {p}" for p in problems]
    return manifest, "\n".join(lines), problems


# --- the whole operation -------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    return package_versions("bake", "gguf", "torch", "transformers", "llama_cpp_python")


def _dequantized(model: str, recipe: Recipe | None) -> Path:
    return resolve_model(model, recipe.revision if recipe else None, recipe.base_dir if recipe else None).path


def _verify(
    model: str,
    source: Path,
    staged: Path,
    vectors: VectorSet,
    verify: VerifySpec,
    recipe: Recipe | None,
    run_llama: bool,
) -> dict[str, Any]:
    problems = check(staged, *read_manifest(staged))
    report: dict[str, Any] = {"file_problems": problems, "llama_cpp": None, "llama_cpp_skipped": None}
    if not run_llama:
        report["llama_cpp_skipped"] = f"llama-cpp-python is not installed: {llamacpp.INSTALL}"
    else:
        try:
            dequantized = _dequantized(model, recipe)
        except ValueError as e:  # transformers' GGUF reader covers fewer architectures than llama.cpp
            report["llama_cpp_skipped"] = f"transformers cannot read this GGUF to steer it by hooks ({e})"
        else:
            report["llama_cpp"] = llamacpp.compare(source, staged, dequantized, vectors, verify.prompts)
    report["passed"] = not problems and (report["llama_cpp"] is None or report["llama_cpp"]["passed"])
    return report


def fold(
    model: str,
    vectors: VectorSet,
    out: str | Path,
    *,
    force: bool = False,
    verify: VerifySpec | None = None,
    base_model_id: str | None = None,
    recipe: Recipe | None = None,
    llama_cpp: bool | None = None,
) -> BakeResult:
    """Write the GGUF ``model`` with ``vectors`` baked in as bias tensors to ``out`` (a .gguf file), then verify.

    The output is staged beside ``out`` and renamed into place only after its bytes match
    its manifest and, with llama-cpp-python installed (``llama_cpp=None``: if importable),
    llama.cpp's logits show the steering the hooks apply (``bake.formats.gguf.llamacpp``). Otherwise
    nothing is written; the source is never touched.
    """
    source = gguf_file(model, recipe.base_dir if recipe else None)
    out = Path(out)
    if not is_gguf(out):
        raise BakeError(f"output {str(out)!r} does not end in .gguf: name the GGUF file to write")
    check_output(out, force, is_steered_gguf, [source], source.stat().st_size)
    reader = read_gguf(source)
    where = repr(str(source))
    arch, biases = plan(reader, vectors, where)
    counts = {"kv_count": len(_kv_fields(reader)), "tensor_count": len(reader.tensors)}
    manifest = GGUFManifest(
        format="bake-gguf-manifest/1",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(),
        base=GGUFBase(spec=model, file=source.name, sha256=sha256_file(source), base_model_id=base_model_id),
        architecture=arch,
        llama_cpp_source=f"{LLAMA_CPP}: {lookup(arch, where).source}",
        recipe=RecipeRecord(text=recipe.text, base_dir=str(recipe.base_dir)) if recipe else None,
        vectors=vectors.meta,
        biases=[
            BiasRecord(
                vector=b.vector,
                layer=b.layer,
                site=b.site,
                tensor=b.tensor,
                had_bias=b.original is not None,
                scale=b.scale,
                norm=b.norm,
            )
            for b in biases
        ],
        copied=GGUFCopied(
            **counts,
            alignment=int(reader.alignment),
            **_digests(
                reader, counts["kv_count"], counts["tensor_count"], {b.tensor for b in biases if b.original is not None}
            ),
        ),
    )
    size = source.stat().st_size
    with staged_output(out, force, ours=is_steered_gguf, sources=[source], needed=size, file=True) as staged:
        verification_at = _write(source, reader, staged, biases, manifest, vectors)
        del reader
        report = _verify(
            model,
            source,
            staged,
            vectors,
            verify or VerifySpec(),
            recipe,
            llamacpp.available() if llama_cpp is None else llama_cpp,
        )
        if not report["passed"]:
            raise BakeError(
                describe(report) + "".join(f"; {p}" for p in report["file_problems"]) + ": nothing was written"
            )
        _patch_verification(staged, verification_at, report)
    manifest.verification = report
    return BakeResult(out, manifest)
