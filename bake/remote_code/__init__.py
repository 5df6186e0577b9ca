"""Files bake ships inside checkpoints (never imported by bake's own pipeline)."""
