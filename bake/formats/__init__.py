"""Output formats: each writes, checks and (where it can) undoes a bake in its own kind of file."""
