"""Stage 6: the Lightning training loop.

``ftpipe.train.run.train(cfg) -> TrainResult`` is the entry (``ftpipe train``); ``module.SFTModule``
the LightningModule (token-mean loss per optimizer step, AdamW, clipping by the global norm);
``optim`` the parameter groups and schedule; ``callbacks`` throughput/MFU/memory, ``metrics.jsonl`` and
checkpoint handling; ``trainer`` the Trainer; ``checkpoint`` reads a checkpoint without a process group.
"""
