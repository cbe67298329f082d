"""Stage 6: the Lightning training loop."""
