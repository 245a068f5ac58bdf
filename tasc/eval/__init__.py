"""Evaluation: task metrics (``metrics``, code in a ``sandbox``), the benchmark methods
(``methods``), the side-by-side harness (``harness``) and the promotion rule (``promotion``)."""
