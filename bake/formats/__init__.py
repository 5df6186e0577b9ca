"""Output formats: each writes, checks and (where it can) undoes a bake in its own kind of file.

``for_path`` is the one place that decides which format a target is; ``bake.api`` calls only the ``Format``
interface (``bake.formats.base``) of what it returns.
"""

from __future__ import annotations

from pathlib import Path

from bake.errors import BakeError
from bake.formats.base import Format
from bake.formats.gguf.output import GGUF
from bake.formats.hf.output import HF
from bake.gguffile import is_gguf

FORMATS: dict[str, Format] = {HF.name: HF, GGUF.name: GGUF}


def for_path(path: str | Path, name: str | None = None) -> Format:
    """The format named ``name``, else the one ``path`` is in (a .gguf file, else a checkpoint folder)."""
    name = name or (GGUF.name if is_gguf(path) else HF.name)
    if name not in FORMATS:
        raise BakeError(f"unknown output format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]
