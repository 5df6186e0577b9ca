"""Reading and writing safetensors checkpoints tensor by tensor, without loading a model.

Headers are parsed directly (8-byte length + JSON), so an unchanged tensor is
copied as raw bytes and an unchanged shard as a whole file: byte-identical,
with memory bounded by the largest changed tensor. Output is staged in a
temporary folder beside the target and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from bake.errors import BakeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXTRA_SHARD = "model-bake-steering.safetensors"
RENAMED_SINGLE = "model-base.safetensors"
# Weight files of other formats are never shipped: they would carry unsteered weights.
_FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors")
_COPY_CHUNK = 1 << 24

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    """Absolute byte range of the data in ``file``."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    def copy_to(self, out) -> None:
        """Stream this tensor's raw bytes into the open file ``out`` at its current position."""
        with open(self.file, "rb") as src:
            src.seek(self.start)
            remaining = self.end - self.start
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                out.write(chunk)
                remaining -= len(chunk)

    def read(self) -> torch.Tensor:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            raw = bytearray(f.read(self.end - self.start))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(self.torch_dtype).reshape(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and ``__metadata__`` of one safetensors file, from its header only."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.fstat(f.fileno()).st_size - 8:  # another format's bytes read as a length: never allocate that
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        base = 8 + n
        infos = {
            name: TensorInfo(name, path, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0], base + h["data_offsets"][1])
            for name, h in header.items()
        }
    except (OSError, struct.error, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
        raise BakeError(f"{str(path)!r} is not a readable safetensors file ({e.__class__.__name__})") from None
    return infos, meta


def header_bytes(path: Path) -> bytes:
    """The raw header of a safetensors file (JSON and padding), to rebuild the file exactly."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


@dataclass
class Checkpoint:
    """A local HF checkpoint folder read through its shard headers."""

    path: Path
    shards: dict[str, dict[str, TensorInfo]]
    metadata: dict[str, dict[str, str]]
    index_meta: dict
    indexed: bool

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if (path / SINGLE).is_file():
            names, indexed, index_meta = [SINGLE], False, {}
        elif (path / INDEX).is_file():
            index = json.loads((path / INDEX).read_text())
            names, indexed, index_meta = sorted(set(index["weight_map"].values())), True, index.get("metadata", {})
        else:
            found = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
            hint = " (only pickle weights found: convert to safetensors first; bake never loads pickles)" if found else ""
            raise BakeError(f"{str(path)!r} has no model.safetensors or {INDEX}{hint}")
        shards, metadata = {}, {}
        for name in names:
            shards[name], metadata[name] = read_header(path / name)
        return cls(path, shards, metadata, index_meta, indexed)

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def find(self, name: str) -> TensorInfo | None:
        for infos in self.shards.values():
            if name in infos:
                return infos[name]
        return None

    def names(self) -> Iterator[str]:
        for infos in self.shards.values():
            yield from infos


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_shard(
    dst: Path,
    items: list[tuple[str, TensorInfo | torch.Tensor]],
    metadata: dict[str, str],
) -> int:
    """Write one safetensors file; a ``TensorInfo`` item is copied as raw bytes from its source.

    Returns the number of data bytes (for the index's ``total_size``).
    """
    header: dict = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for name, item in items:
        if isinstance(item, TensorInfo):
            dtype, shape, size = item.dtype, list(item.shape), item.end - item.start
        else:
            dtype, shape, size = _ST_NAMES[item.dtype], list(item.shape), item.numel() * item.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, item in items:
            if isinstance(item, TensorInfo):
                item.copy_to(out)
            else:
                out.write(_tensor_bytes(item))
    return offset


def write_checkpoint(
    src: Checkpoint,
    dst: Path,
    changed: dict[str, torch.Tensor],
    added: dict[str, torch.Tensor],
    config: dict,
    cast: torch.dtype | None = None,
    removed: set[str] = frozenset(),
    link: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Write ``src`` into the (empty) folder ``dst`` with tensors replaced, added and removed.

    Shards with no replaced or removed tensor (and no ``cast``) are copied byte for byte,
    and a shard whose tensors are only replaced by same-sized ones is copied and patched
    in place (its header, order and metadata unchanged); new tensors go to an extra shard so no original shard has to change. With
    ``cast``, floating tensors are converted one at a time. With ``link``, unchanged
    shards are hard-linked instead of copied where the filesystem allows (the
    output then shares those files with the source: replace, never edit, them).
    Returns where each source shard went (the single file is renamed when an extra
    shard joins it) and the output shards that were rewritten or patched.
    """
    unknown = sorted((set(changed) | set(removed)) - set(src.names()))
    if unknown:
        raise ValueError(f"replacing tensors that do not exist: {unknown[:3]}")
    weight_map: dict[str, str] = {}
    total = 0
    rewritten = []
    placed = {}
    for shard, infos in src.shards.items():
        out_name = placed[shard] = RENAMED_SINGLE if (added and not src.indexed) else shard
        needs_cast = cast is not None and any(i.torch_dtype.is_floating_point and i.torch_dtype != cast for i in infos.values())
        touched = changed.keys() & infos.keys()
        if not needs_cast and not removed & infos.keys() and all(_same_layout(infos[n], changed[n]) for n in touched):
            # Unchanged, or only same-sized tensors replaced: the original file with those bytes
            # overwritten, so header, order and metadata stay exactly as they were.
            place_copy(src.path / shard, dst / out_name, link and not touched)
            if touched:
                _patch(dst / out_name, [(infos[n], changed[n]) for n in touched])
                rewritten.append(out_name)
            total += sum(i.end - i.start for i in infos.values())
        else:
            items = []
            for name, info in infos.items():
                if name in removed:
                    continue
                if name in changed:
                    items.append((name, changed[name]))
                elif needs_cast and info.torch_dtype.is_floating_point and info.torch_dtype != cast:
                    items.append((name, info.read().to(cast)))
                else:
                    items.append((name, info))
            total += write_shard(dst / out_name, items, src.metadata[shard])
            rewritten.append(out_name)
        weight_map.update({name: out_name for name in infos if name not in removed})
    if added:
        clash = sorted(set(added) & weight_map.keys())
        if clash:
            raise ValueError(f"adding tensors that already exist: {clash[:3]}")
        total += write_shard(dst / EXTRA_SHARD, sorted(added.items()), {})
        weight_map.update({name: EXTRA_SHARD for name in added})
        rewritten.append(EXTRA_SHARD)
    if src.indexed or added:
        index = {"metadata": {**src.index_meta, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return placed, rewritten


def _same_layout(info: TensorInfo, tensor: torch.Tensor) -> bool:
    return info.torch_dtype == tensor.dtype and info.shape == tuple(tensor.shape)


def _patch(path: Path, edits: list[tuple[TensorInfo, torch.Tensor]]) -> None:
    """Overwrite tensors in place in a copied shard (same dtype and shape, so the same byte ranges)."""
    with open(path, "r+b") as f:
        for info, tensor in edits:
            f.seek(info.start)
            f.write(_tensor_bytes(tensor))


def place_copy(src: Path, dst: Path, link: bool = False) -> None:
    """A byte-identical ``dst``: a hard link when allowed and possible, else an in-kernel copy."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not supported
            pass
    kernel_copy(src, dst)


def kernel_copy(src: Path, dst: Path) -> None:
    """Copy with ``copy_file_range`` as ``cp`` does (a reflink or server-side copy where the filesystem offers
    one, no bytes through user space), falling back to ``shutil.copyfile`` where the call is missing or refused."""
    if hasattr(os, "copy_file_range"):
        try:
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                left = os.fstat(fin.fileno()).st_size
                while left > 0:
                    done = os.copy_file_range(fin.fileno(), fout.fileno(), min(left, 1 << 30))
                    if done == 0:  # the file shrank under us: let the fallback copy what is there
                        raise OSError("short copy")
                    left -= done
            return
        except OSError:  # EXDEV on old kernels, ENOSYS, EINVAL on some filesystems
            pass
    shutil.copyfile(src, dst)


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy tokenizer, chat template, generation config and other top-level files byte for byte.

    Weight files of any format, the index and ``skip`` are left out (they are
    written by the fold). Sub-folders (e.g. ``original/`` pickles) are not shipped.
    """
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and p.name != INDEX and not p.name.endswith(_FOREIGN_WEIGHTS):
            kernel_copy(p, dst / p.name)
            copied.append(p.name)
    return copied


def default_mode(path: Path, directory: bool) -> None:
    """Give a mkdtemp/mkstemp path (0700/0600) the permissions a normal create would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def staged_output(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; rename it to ``target`` only on success.

    Any failure leaves no output folder (and an existing one untouched).
    """
    target = Path(target)
    if target.exists() and not force:
        raise BakeError(f"output {str(target)!r} already exists: choose another path or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        default_mode(staging, directory=True)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
