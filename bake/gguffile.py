"""GGUF files, the basics every part shares: the one test for "is this a GGUF" and the one reader wrapper.

``gguf`` is an optional dependency (``bake[gguf]``), imported only when a file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bake.errors import BakeError

SUFFIX = ".gguf"


def is_gguf(path: str | Path) -> bool:
    """Whether a path or model spec names a GGUF file (by its suffix, case-insensitive)."""
    return str(path).lower().endswith(SUFFIX)


def read_gguf(path: str | Path, fix: str = "check the file") -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (little-endian only); ``fix`` ends the one-line error for a broken file."""
    try:
        from gguf import GGUFReader  # optional
    except ImportError:
        raise BakeError("reading GGUF files needs the 'gguf' package: pip install 'bake[gguf]'") from None
    where = repr(str(path))
    if not Path(path).is_file():
        raise BakeError(f"GGUF file {where} not found: check the path")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on a broken file
        raise BakeError(f"{where} is not a readable GGUF file ({e.__class__.__name__}): {fix}") from None
    if reader.byte_order != "I":
        raise BakeError(f"{where} is a big-endian GGUF: bake reads little-endian files only; use a little-endian one")
    return reader


def gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value, or ``default`` when it is missing or malformed (never a traceback)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # a malformed value counts as missing
        return default
