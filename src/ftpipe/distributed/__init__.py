"""Stage 5: parallelism, kept apart from the model: FSDP2/FSDP1/DDP strategies, wrapping, checkpointing."""
