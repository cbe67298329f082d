"""Stage 2 and 3: data preparation (rank 0), tokenization with loss masking, and batching."""
