"""Reading and writing safetensors checkpoints tensor by tensor, without loading a model.

Headers are parsed directly (8-byte length + JSON), so an unchanged tensor is
copied as raw bytes and an unchanged shard as a whole file: byte-identical,
with memory bounded by the largest changed tensor. Output is staged in a
temporary folder beside the target and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bake.errors import BakeError, OutputExists

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXTRA_SHARD = "model-bake-steering.safetensors"
RENAMED_SINGLE = "model-base.safetensors"
# Weight files of other formats are never shipped: they would carry unsteered weights.
_FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors")
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_COPY_CHUNK = 1 << 24

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def plain_name(name: str) -> str:
    """A file name read from a manifest or index: one plain name inside its folder, nothing that reaches out."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a plain file name (no separators, no '..')")
    return name


def inner_path(name: str) -> str:
    """A relative path read from a manifest (``bake/vectors.safetensors``): plain names joined by '/'."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        raise ValueError(f"{name!r} is not a relative path inside the folder")
    for part in name.split("/"):
        plain_name(part)
    return name


def inside(folder: Path, name: str, what: str = "manifest") -> Path:
    """``folder / name`` once it is known to stay in ``folder`` with every symlink resolved (a Hub cache snapshot's
    files are symlinks into the same repository's ``blobs/``, which counts as inside)."""
    path = Path(folder) / name
    root = Path(folder).resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    if not any(path.resolve().is_relative_to(r) for r in roots):
        raise BakeError(
            f"{str(folder)!r}: the {what} names {name!r}, which leads outside the folder: refusing to use it"
        )
    return path


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

    def copy_to(self, out: BinaryIO | HashingWriter) -> None:
        """Stream this tensor's raw bytes into the open file ``out`` at its current position."""
        with open(self.file, "rb") as src:
            src.seek(self.start)
            remaining = self.end - self.start
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:  # end of file before the header's end of data: never loop on an empty read
                    raise self._truncated(self.end - remaining)
                out.write(chunk)
                remaining -= len(chunk)

    def read(self) -> torch.Tensor:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            raw = bytearray(f.read(self.end - self.start))
        if len(raw) != self.end - self.start:
            raise self._truncated(self.start + len(raw))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(self.torch_dtype).reshape(self.shape)

    def _truncated(self, at: int) -> BakeError:
        return BakeError(
            f"{str(self.file)!r} is truncated: tensor {self.name} needs bytes up to {self.end} but "
            f"the file ends at {at}: download or copy the file again"
        )


def _unreadable(path: Path, why: str) -> BakeError:
    return BakeError(f"{str(path)!r} is not a readable safetensors file ({why}): download or copy it again")


def header_bytes(path: Path) -> bytes:
    """The raw header of a safetensors file (JSON and padding), checked to be all there."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _unreadable(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise _unreadable(path, f"truncated: the header needs {n} bytes, the file has {size - 8} after it")
            return f.read(n)
    except OSError as e:
        raise _unreadable(path, e.__class__.__name__) from None


def _tensor_info(path: Path, name: str, h: Any, base: int, size: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of sizes, a data range inside the file that fits the shape."""
    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise _unreadable(path, f"tensor {name!r} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
    if dtype not in ST_DTYPES:
        raise _unreadable(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _unreadable(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _unreadable(path, f"tensor {name!r} has data_offsets {offsets!r}, not [start, end]")
    info = TensorInfo(name, path, dtype, tuple(shape), base + offsets[0], base + offsets[1])
    if info.end > size:
        raise info._truncated(size)
    if info.end - info.start != math.prod(shape) * ST_DTYPES[dtype].itemsize:
        raise _unreadable(path, f"tensor {name!r}: {info.end - info.start} data bytes do not fit {dtype} shape {shape}")
    return info


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and ``__metadata__`` of one safetensors file, from its header only.

    Everything is checked against the file before any work: a truncated shard is refused here, by name,
    rather than found half-way through a copy."""
    raw = header_bytes(path)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _unreadable(path, e.__class__.__name__) from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _unreadable(path, "__metadata__ is not a map of strings")
    size = path.stat().st_size
    infos = {name: _tensor_info(path, name, h, 8 + len(raw), size) for name, h in header.items()}
    return infos, meta


def require_safetensors(path: Path) -> None:
    """Refuse a model folder whose weights are not safetensors before anything reads it.

    transformers would unpickle a ``pytorch_model.bin`` (and a pickle can run any code), so every command
    checks here before its first load: bake never loads pickles, by design rather than by torch's defaults.
    """
    path = Path(path)
    if not ((path / SINGLE).is_file() or (path / INDEX).is_file()):
        found = sorted(p.name for p in path.iterdir() if p.name.endswith(_PICKLE_WEIGHTS)) if path.is_dir() else []
        hint = (
            f" (only pickle weights found: {', '.join(found[:3])}; bake never loads pickles: convert them to "
            "safetensors first)"
            if found
            else ": give a folder with safetensors weights"
        )
        raise BakeError(f"{str(path)!r} has no {SINGLE} or {INDEX}{hint}")
    try:
        named = json.loads((path / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):  # no or unreadable config: the config reader reports it
        return
    safe = isinstance(named, str) and named.endswith((".safetensors", ".safetensors.index.json"))
    if named is not None and not safe:
        raise BakeError(
            f"{str(path / 'config.json')!r} points transformers at weights {named!r}, not a safetensors "
            "file: bake never loads pickles; remove transformers_weights or convert the weights"
        )


@dataclass
class Checkpoint:
    """A local HF checkpoint folder read through its shard headers."""

    path: Path
    shards: dict[str, dict[str, TensorInfo]]
    metadata: dict[str, dict[str, str]]
    index_meta: dict
    indexed: bool

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        require_safetensors(path)
        if (path / SINGLE).is_file():
            names, indexed, index_meta = [SINGLE], False, {}
        else:
            try:
                index = json.loads((path / INDEX).read_text())
                names, indexed, index_meta = sorted(set(index["weight_map"].values())), True, index.get("metadata", {})
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                raise BakeError(
                    f"{str(path / INDEX)!r} is not a valid safetensors index ({e.__class__.__name__}): "
                    "it needs a 'weight_map' object of tensor -> shard names"
                ) from None
            for name in names:
                try:
                    inside(path, plain_name(name), INDEX)
                except ValueError as e:
                    raise BakeError(f"{str(path / INDEX)!r}: weight_map: {e}: refusing to read it") from None
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


class HashingWriter:
    """An open binary file that hashes every byte written through it: a shard's sha256 as it is written, with
    no second read (``bake.manifest.FileHash`` records it)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def digest(self) -> dict[str, Any]:
        return {"sha256": self.sha256.hexdigest(), "size": self.size}


def _copy_bytes(src: BinaryIO, out: BinaryIO | HashingWriter, n: int, what: Path) -> None:
    """Copy ``n`` bytes from ``src`` (at its position) to ``out``, in bounded chunks."""
    while n:
        chunk = src.read(min(_COPY_CHUNK, n))
        if not chunk:
            raise _unreadable(what, "the file ended early (truncated)")
        out.write(chunk)
        n -= len(chunk)


def file_digest(path: Path) -> dict[str, Any]:
    """sha256 and size of a file, read once in bounded chunks (a hard-linked shard, or a check of one)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def write_shard(
    dst: Path,
    items: list[tuple[str, TensorInfo | torch.Tensor]],
    metadata: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    """Write one safetensors file; a ``TensorInfo`` item is copied as raw bytes from its source.

    Returns the number of data bytes (for the index's ``total_size``) and the file's digest.
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
    with open(dst, "wb") as f:
        out = HashingWriter(f)
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, item in items:
            if isinstance(item, TensorInfo):
                item.copy_to(out)
            else:
                out.write(_tensor_bytes(item))
    return offset, out.digest()


def _place_shard(src: Path, dst: Path, link: bool, edits: list[tuple[TensorInfo, torch.Tensor]]) -> dict[str, Any]:
    """``dst`` as ``src`` with each edited tensor's bytes overwritten (same dtype and shape, so the same byte ranges:
    header, order and metadata unchanged), in one hashing pass; an unedited shard is hard-linked when ``link``
    allows (then hashed by reading it once). Returns its digest."""
    if link and not edits:
        try:
            os.link(src, dst)
            return file_digest(dst)
        except OSError:  # another filesystem, or links not supported
            pass
    with open(src, "rb") as fin, open(dst, "wb") as f:
        out = HashingWriter(f)
        position = 0
        for info, tensor in sorted(edits, key=lambda e: e[0].start):
            _copy_bytes(fin, out, info.start - position, src)
            out.write(_tensor_bytes(tensor))
            fin.seek(info.end)
            position = info.end
        _copy_bytes(fin, out, os.fstat(fin.fileno()).st_size - position, src)
    return out.digest()


def write_checkpoint(
    src: Checkpoint,
    dst: Path,
    changed: dict[str, torch.Tensor],
    added: dict[str, torch.Tensor],
    config: dict,
    cast: torch.dtype | None = None,
    removed: set[str] = frozenset(),
    link: bool = False,
) -> tuple[dict[str, str], list[str], dict[str, dict[str, Any]]]:
    """Write ``src`` into the (empty) folder ``dst`` with tensors replaced, added and removed.

    Shards with no replaced or removed tensor (and no ``cast``) are copied byte for byte,
    and a shard whose tensors are only replaced by same-sized ones is copied and patched
    in place (its header, order and metadata unchanged); new tensors go to an extra shard so
    no original shard has to change. With ``cast``, floating tensors are converted one at a time.
    With ``link``, unchanged shards are hard-linked instead of copied where the filesystem allows
    (the output then shares those files with the source: replace, never edit, them).
    Returns where each source shard went (the single file is renamed when an extra
    shard joins it), the output shards that were rewritten or patched, and every output shard's sha256 and
    size, hashed as it was written.
    """
    unknown = sorted((set(changed) | set(removed)) - set(src.names()))
    if unknown:
        raise ValueError(f"replacing tensors that do not exist: {unknown[:3]}")
    weight_map: dict[str, str] = {}
    total = 0
    rewritten = []
    placed = {}
    digests = {}
    for shard, infos in src.shards.items():
        out_name = placed[shard] = RENAMED_SINGLE if (added and not src.indexed) else shard
        needs_cast = cast is not None and any(
            i.torch_dtype.is_floating_point and i.torch_dtype != cast for i in infos.values()
        )
        touched = changed.keys() & infos.keys()
        if not needs_cast and not removed & infos.keys() and all(_same_layout(infos[n], changed[n]) for n in touched):
            # Unchanged, or only same-sized tensors replaced: the original file with those bytes
            # overwritten, so header, order and metadata stay exactly as they were.
            edits = [(infos[n], changed[n]) for n in touched]
            digests[out_name] = _place_shard(src.path / shard, dst / out_name, link, edits)
            if touched:
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
            size, digests[out_name] = write_shard(dst / out_name, items, src.metadata[shard])
            total += size
            rewritten.append(out_name)
        weight_map.update({name: out_name for name in infos if name not in removed})
    if added:
        clash = sorted(set(added) & weight_map.keys())
        if clash:
            raise ValueError(f"adding tensors that already exist: {clash[:3]}")
        extra = _extra_shard(set(placed.values()))
        size, digests[extra] = write_shard(dst / extra, sorted(added.items()), {})
        total += size
        weight_map.update({name: extra for name in added})
        rewritten.append(extra)
    if src.indexed or added:
        index = {"metadata": {**src.index_meta, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return placed, rewritten, digests


def _extra_shard(taken: set[str]) -> str:
    """The name of the shard new tensors go to, not one of ``taken`` (a bake on top of a bake already has one,
    with the tensors the first bake added: writing over it would lose them)."""
    names = (EXTRA_SHARD, *(EXTRA_SHARD.replace(".safetensors", f"-{n}.safetensors") for n in range(2, len(taken) + 2)))
    return next(name for name in names if name not in taken)


def _same_layout(info: TensorInfo, tensor: torch.Tensor) -> bool:
    return info.torch_dtype == tensor.dtype and info.shape == tuple(tensor.shape)


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


def _inside(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b)


def _existing_ancestor(path: Path) -> Path:
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    return parent


def _what_is(path: Path) -> str:
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)!r}"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        more = ", ..." if len(names) > 3 else ""
        return f"a folder of {len(names)} entries ({', '.join(names[:3])}{more})" if names else "an empty folder"
    return f"a file of {path.stat().st_size} bytes"


def folder_bytes(path: Path) -> int:
    """Bytes of the top-level files of ``path``: about what a copy of the checkpoint writes."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding ``path`` (a module function so tests can stand in a full disk)."""
    return shutil.disk_usage(path).free


def check_output(
    target: str | Path, force: bool, ours: Callable[[Path], bool], sources: Iterable[str | Path] = (), needed: int = 0
) -> None:
    """Refuse, before any work, an output bake must not write; every writer calls this first.

    Never the source, inside it or around it (symlinks resolved), never the working folder, never under a file
    or on a read-only filesystem, never without ``needed`` bytes free; an existing output only with ``force`` and
    only when ``ours(target)`` says bake wrote it.
    """
    target = Path(target)
    full = Path(os.path.abspath(target))
    resolved = full.resolve()
    for src in sources:
        s = Path(src).resolve()
        if _inside(resolved, s) or _inside(s, resolved):
            where = "is" if resolved == s else "is inside" if _inside(resolved, s) else "contains"
            raise BakeError(f"output {str(target)!r} {where} the source {str(src)!r}: write to a new path outside it")
    if os.path.lexists(full) and _inside(Path.cwd().resolve(), resolved):
        raise BakeError(f"output {str(target)!r} is or contains the current folder: write to a new path outside it")
    anchor = _existing_ancestor(full)
    if not anchor.is_dir():
        raise BakeError(
            f"output {str(target)!r}: {str(anchor)!r} is a file, not a folder: choose a path under a folder"
        )
    if not os.access(anchor, os.W_OK | os.X_OK) or os.statvfs(anchor).f_flag & os.ST_RDONLY:
        raise BakeError(f"output {str(target)!r}: the folder {str(anchor)!r} is read-only: choose a writable path")
    _clear_stale(full)
    if os.path.lexists(full):
        if not force:
            raise OutputExists(target)
        if full.is_symlink() or not ours(full):
            raise BakeError(
                f"output {str(target)!r} is {_what_is(full)}, not an output bake wrote: --force "
                "replaces only bake's own outputs; remove it yourself or choose another path"
            )
    free = free_bytes(anchor)
    if needed > free:
        raise BakeError(
            f"output {str(target)!r}: needs about {needed} bytes but {str(anchor)!r} has {free} free: "
            "free some space or choose another disk"
        )


def _staging_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clear_stale(target: Path) -> None:
    """What a killed run left beside ``target``, handled before ``target`` itself is looked at: its staging is
    removed, and an old output it had moved aside to replace (``--force``) is put back when nothing took its
    place, so a kill at any instant loses no output. Refused while that process still runs (another bake is
    writing the same output); the name says whose it is."""
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = _staging_pattern(target.name)
    for p in sorted(parent.iterdir()):
        m = pattern.match(p.name)
        if not m or int(m[2]) == os.getpid():
            continue
        if _alive(int(m[2])):
            raise BakeError(
                f"another bake run (pid {m[2]}) is writing {str(target)!r} now ({p.name} beside it): "
                "wait for it or choose another path"
            )
        if m[1] == "old" and not os.path.lexists(target):
            os.rename(p, target)
        else:
            _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_RACED = "was created by another run while this one worked (nothing was replaced)"
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with FileExistsError if anything is at ``dst``.

    Linux ``renameat2(RENAME_NOREPLACE)``; where the filesystem or libc lacks it, a hard link for a file
    (fails if ``dst`` exists) and for a folder an empty ``mkdir(dst)`` taken as a lock and then replaced.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():
        os.mkdir(dst)  # FileExistsError when taken: this run lost
        os.rename(src, dst)  # replaces only the empty folder just made
    else:
        os.link(src, dst)
        os.unlink(src)


def _beside(target: Path, kind: str) -> Path:
    """A fresh name beside ``target`` that ``_staging_pattern`` recognises as this process's ``kind``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def _create_staging(staging: Path, target: Path, file: bool) -> None:
    """The empty staging file or folder, private (``default_mode`` opens it up on success), never an existing one."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if file:
            os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        else:
            staging.mkdir(mode=0o700)
    except OSError as e:
        raise BakeError(f"cannot write beside {str(target)!r} ({e.strerror}): choose a writable path") from None


def _publish(staging: Path, target: Path, force: bool, ours: Callable[[Path], bool]) -> None:
    """The final step: ``staging`` becomes ``target``; an existing one is replaced only with ``force``, and only
    if it is still bake's (it may have changed while this run worked)."""
    if force and os.path.lexists(target):
        if target.is_symlink() or not ours(target):
            raise BakeError(
                f"output {str(target)!r} became {_what_is(target)} while bake worked, not an output bake "
                "wrote: nothing was replaced"
            )
        old = _beside(target, "old")
        try:  # from the first rename on, a failure or signal at any point puts the old output back
            rename_noreplace(target, old)
            rename_noreplace(staging, target)
        except FileExistsError:
            raise OutputExists(target, _RACED) from None
        finally:
            if os.path.lexists(old):
                if os.path.lexists(target):
                    _remove(old)
                else:
                    os.rename(old, target)
        return
    try:
        rename_noreplace(staging, target)
    except FileExistsError:
        raise OutputExists(target, _RACED) from None


@contextlib.contextmanager
def staged_output(
    target: str | Path,
    force: bool = False,
    *,
    ours: Callable[[Path], bool] = lambda path: False,
    sources: Iterable[str | Path] = (),
    file: bool = False,
    needed: int = 0,
) -> Iterator[Path]:
    """Yield an empty temporary folder (or, with ``file``, file path) beside ``target``; it becomes ``target``
    only on success (``check_output`` first, ``rename_noreplace`` last); ``ours`` says what ``force`` may replace
    (by default nothing).

    Any failure, Ctrl-C or SIGTERM leaves no output (and an existing one untouched); the staging name carries
    the pid, so one left by a SIGKILL is recognised by the next run (``_clear_stale``).
    """
    check_output(target, force, ours, sources, needed)
    target = Path(os.path.abspath(target))
    staging = _beside(target, "tmp")
    try:  # named before it exists, so a signal even right after its creation finds it and removes it
        _create_staging(staging, target, file)
        yield staging
        default_mode(staging, directory=not file)
        _publish(staging, target, force, ours)
    except OSError as e:
        _remove(staging)
        if e.errno == errno.ENOSPC:
            raise BakeError(
                f"the disk is full writing {str(target)!r} ({free_bytes(target.parent)} bytes free): "
                "nothing was written; free some space or choose another disk"
            ) from None
        raise
    except BaseException:
        _remove(staging)
        raise
