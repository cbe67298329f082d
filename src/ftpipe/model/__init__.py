"""Stage 4: model loading (any Hugging Face causal LM, the embedded SmolLM2), LoRA, parameter statistics."""
