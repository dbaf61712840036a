"""Flax (linen) experiment models named after their Hugging Face modules, and weight loaders."""
