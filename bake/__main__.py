"""``python -m bake`` (and ``torchrun -m bake``) runs the CLI."""

from bake.cli import main

main()
