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

:func:`progress_bar` lives here, at the root, so that every stage's long loop (ingest, harvest,
benchmark, vocabulary rounds, fine-tuning) shows the same bar without one stage importing another.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

__version__ = "0.1.0"

_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def _bar_disabled() -> bool | None:
    """tqdm's ``disable``: TASC_PROGRESS=0/1 decides; else off under CI and pytest (their logs
    are files), else None, which lets tqdm show the bar only when stderr is a terminal."""
    flag = os.environ.get("TASC_PROGRESS", "").strip().lower()
    if flag in _OFF or flag in _ON:
        return flag in _OFF
    if os.environ.get("CI", "").strip().lower() not in ("", *_OFF) or "PYTEST_CURRENT_TEST" in os.environ:
        return True
    return None


def _emit_above(emit, record: logging.LogRecord) -> None:
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):  # clear the bars, write the line, redraw
        emit(record)


@contextlib.contextmanager
def progress_bar(total: int | None = None, desc: str | None = None, unit: str = "it", show: bool = True,
                 **kw):
    """A tqdm bar on stderr (count, rate and, with ``total``, ETA), as a context manager.

    ``show=False`` or the environment (:func:`_bar_disabled`) turns it into a no-op bar. While
    it is shown, the root logger's terminal handlers (Prefect's console handler is one) clear
    the bar before a log line and redraw it after, so the two never share a line. A nested bar
    (``leave=None``) disappears when done; a top-level one stays as the step's summary.
    """
    from tqdm import tqdm

    disable = True if not show else _bar_disabled()
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True,
              leave=kw.pop("leave", None), **kw) as bar:
        # Only handlers not wrapped yet (by an outer bar), so an inner bar undoes only its own.
        handlers = [] if bar.disable else [
            h for h in logging.getLogger().handlers if "emit" not in vars(h)
            and isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.stdout)]
        for h in handlers:
            h.emit = functools.partial(_emit_above, h.emit)  # an instance attribute shadows the method
        try:
            yield bar
        finally:
            for h in handlers:
                del h.emit
