"""Releasing a baked checkpoint: its model card and the push to the Hugging Face Hub."""
