"""SageMaker adaptation: entry point, launcher, inference handler."""
