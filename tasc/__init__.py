"""tasc: Task-Adaptive Sequence Compression for small language models.

The pure core: n-grams, vocabulary expansion, the draft model, speculative decoding,
fine-tuning, metrics and the benchmark harness. Nothing here imports prefect or mlflow;
orchestration lives in ``flows/`` and ``tasks/``, persistence in ``storage/``.
"""

__version__ = "0.1.0"
