"""tasc: Task-Adaptive Sequence Compression for small language models (arXiv 2602.24174).

The pure core, one folder per stage of the pipeline:

- ``data``    the task spec, readers and ingestion into one corpus;
- ``ngrams``  n-gram counts of the task's outputs;
- ``ft``      TASC-ft: new tokens from frequent n-grams, embedding initialisation, rounds;
- ``train``   fine-tuning (single process or data-parallel);
- ``decode``  TASC-spec: the n-gram draft, the proposer and the verify loop;
- ``accel``   CPU kernels behind the decoders (no algorithm lives there);
- ``eval``    task metrics, benchmark methods and harness, the promotion rule;
- ``models``  loading a GGUF file, a Hugging Face folder or id.

Nothing here imports prefect or mlflow; orchestration lives in ``flows/`` and ``tasks/``,
persistence in ``storage/``. The one exception to the direction is ``cli``: the command line
sits on top of everything and imports ``flows/`` and ``storage/`` inside its commands.
"""

__version__ = "0.1.0"
