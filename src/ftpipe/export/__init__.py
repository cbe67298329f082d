"""Stage 7a: export a checkpoint to a Hugging Face folder (merged or adapter)."""
