"""Fine-tuning on prompt/completion rows (loss on the completion only): settings (``config``),
examples and checkpoints (``io``), the objective (``loss``), the loop (``finetune``), data
parallelism (``distributed``) and the torchrun launcher (``launch``)."""
