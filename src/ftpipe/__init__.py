"""ftpipe: fine-tune causal language models with Lightning, FSDP and PEFT LoRA.

Stages (one sub-package each): config -> data (prepare, tokenize, collate) -> model -> distributed
-> train -> export -> evaluate; ``sagemaker`` adapts the same pipeline to SageMaker training jobs
and ``cli`` maps sub-commands to the stage entry functions.
"""

__version__ = "0.1.0"
