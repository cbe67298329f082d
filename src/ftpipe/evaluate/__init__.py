"""Stage 7b: generation and scoring of the test split."""
