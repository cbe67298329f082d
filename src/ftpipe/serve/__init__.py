"""Talking to a fine-tuned model: ``ftpipe chat`` (the SageMaker serving handler is ``ftpipe.model.serving_handler``)."""
