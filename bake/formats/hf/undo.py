"""Undoing a bake exactly: what a fold keeps for it, and rebuilding the source checkpoint from it.

A fold keeps, under ``bake/undo/``, everything its output no longer holds: the
original values of the tensors it overwrote, the raw headers of the shards it
rewrote, the source's config.json, index and model card verbatim, and (when the
source was itself baked) the source's manifest and ``bake/`` folder. ``unbake``
rebuilds every rewritten shard from its original header, byte for byte, takes the
other shards back unchanged, and so returns the source checkpoint exactly: all
weight files, the config and the side files are bit-identical to it. Baking on top
of a baked model nests the earlier undo data, so unbake removes one layer at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bake import manifest as manifests
from bake.checkpoint import (
    INDEX,
    Checkpoint,
    TensorInfo,
    check_output,
    copy_side_files,
    folder_bytes,
    header_bytes,
    inside,
    kernel_copy,
    place_copy,
    read_header,
    staged_output,
)
from bake.errors import BakeError
from bake.formats.hf.plan import FoldPlan
from bake.manifest import Manifest, ShardUndo, UndoRecord

UNDO = Path("bake") / "undo"
ORIGINALS = UNDO / "tensors.safetensors"
HEADERS = UNDO / "headers.json"
_KEPT_VERBATIM = ("config.json", INDEX, "README.md", manifests.MANIFEST)


def save_undo(
    plan: FoldPlan, placed: dict[str, str], rewritten: list[str], out: Path, written: list[str]
) -> UndoRecord:
    """Keep in ``out/bake/undo`` what ``unbake`` needs; return its description for the manifest.

    ``placed`` maps each source shard to its output file, ``written`` lists the
    top-level files the fold created that the source did not have.
    """
    from safetensors.torch import save_file  # startup

    source = plan.ckpt.path
    (out / UNDO).mkdir(parents=True)
    if plan.changed:
        save_file(
            {name: plan.ckpt.find(name).read() for name in plan.changed}, out / ORIGINALS, metadata={"format": "pt"}
        )
    headers = {shard: header_bytes(source / shard).decode() for shard, name in placed.items() if name in rewritten}
    (out / HEADERS).write_text(json.dumps(headers) + "\n")
    for name in _KEPT_VERBATIM:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / UNDO / name)
    if (source / "bake").is_dir():  # the source was baked: keep its own vectors and undo data
        shutil.copytree(source / "bake", out / UNDO / "bake")
    return UndoRecord(
        folder=UNDO.as_posix(),
        originals=ORIGINALS.as_posix() if plan.changed else None,
        shards={shard: ShardUndo(file=name, rewritten=name in rewritten) for shard, name in placed.items()},
        added=sorted(plan.added),
        splits=plan.splits,
        written=written,
        cast=plan.out_dtype is not None,
    )


def _rebuild(
    dst: Path, header: bytes, ckpt: Checkpoint, originals: dict[str, TensorInfo], splits: dict[str, list[str]]
) -> None:
    """Write a shard with its original ``header`` verbatim and every tensor's original bytes at its offset."""
    entries = json.loads(header)
    entries.pop("__metadata__", None)
    base = 8 + len(header)
    with open(dst, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for name, h in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            sources = [originals[name]] if name in originals else [ckpt.find(p) for p in splits.get(name, [name])]
            if None in sources:
                raise BakeError(f"{str(ckpt.path)!r} has lost tensor {name}: it cannot be unbaked")
            size = sum(s.end - s.start for s in sources)
            start, end = h["data_offsets"]
            if size != end - start or any(s.dtype != h["dtype"] for s in sources):
                raise BakeError(
                    f"{name} no longer has its original dtype and size: the checkpoint was changed after baking"
                )
            out.seek(base + start)
            for s in sources:
                s.copy_to(out)


def unbake(path: str | Path, out: str | Path, force: bool = False, link: bool = False) -> Manifest | None:
    """Write the checkpoint ``path`` was baked from into ``out``, bit for bit; ``path`` is not modified.

    Refused when the weights no longer match the manifest (the result would not be
    the original) or when the bake cast the weights to another dtype. ``link``
    hard-links the shards the bake did not change. Returns the manifest of the
    restored checkpoint when it was itself baked (one layer of history removed).
    """
    path = Path(path)
    check_output(out, force, manifests.is_bake_folder, [path])
    manifest = manifests.read(path)
    undo = manifest.fold.undo
    if undo is None:
        raise BakeError(f"{str(path)!r} keeps no undo data (baked by an older bake): bake the base model again instead")
    if undo.cast:
        raise BakeError(
            f"{str(path)!r} was cast to another dtype when baked, so its original weights are gone: use the base "
            "model itself"
        )
    problems = manifests.check(path, manifest)
    if problems:
        raise BakeError(
            f"{str(path)!r} was changed after baking ({problems[0]}): unbaking it would not give the original back"
        )
    ckpt = Checkpoint.open(path)
    folder = path / undo.folder
    originals = read_header(path / undo.originals)[0] if undo.originals else {}
    try:
        headers = json.loads((path / HEADERS).read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: refused below like a wrong one
        headers = None
    if not isinstance(headers, dict) or set(headers) != {s for s, p in undo.shards.items() if p.rewritten}:
        raise BakeError(
            f"{str(path / HEADERS)!r} does not list the rewritten shards of the manifest: it cannot be unbaked"
        )
    for p in [*path.iterdir(), *(folder / "bake").rglob("*")]:  # no symlink may bring in a file from elsewhere
        inside(path, p.relative_to(path).as_posix(), "folder")
    needed = 0 if link else folder_bytes(path)
    with staged_output(Path(out), force, ours=manifests.is_bake_folder, sources=[path], needed=needed) as stage:
        for shard, placed in undo.shards.items():
            if placed.rewritten:
                _rebuild(stage / shard, str(headers[shard]).encode(), ckpt, originals, undo.splits)
            else:
                place_copy(path / placed.file, stage / shard, link)
        copy_side_files(path, stage, skip=set(_KEPT_VERBATIM) | set(undo.written))
        for name in _KEPT_VERBATIM:
            if (folder / name).is_file():
                kernel_copy(folder / name, stage / name)
        if (folder / "bake").is_dir():
            shutil.copytree(folder / "bake", stage / "bake")
    return manifests.read(out) if (Path(out) / manifests.MANIFEST).is_file() else None
