"""Task metrics: score one generation against one corpus row.

Every metric returns a float in ``[0, 1]``. Task specs name a metric; :func:`score`
dispatches on that name, reading what it needs from the corpus row:

* ``exact_match`` / ``f1``: ``answers`` (accepted answers; defaults to ``[completion]``);
* ``json_fields``: ``completion`` is the reference JSON object;
* ``chrf``: ``completion`` is the reference text;
* ``mbpp_pass``: ``tests`` (assert statements) and optional ``test_setup``.

Rows often come from Parquet via pandas, so list-valued extras may be numpy arrays and
missing ones may be ``None`` or NaN; all of these are accepted.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tasc.eval.sandbox import run_sandboxed

__all__ = [
    "METRIC_DESCRIPTIONS",
    "chrf",
    "exact_match",
    "extract_code",
    "extract_json_object",
    "flatten_json",
    "json_field_accuracy",
    "mbpp_pass",
    "normalize_answer",
    "score",
    "score_many",
    "token_f1",
]

METRIC_DESCRIPTIONS: dict[str, str] = {
    "exact_match": "normalized exact match (SQuAD normalisation), best over accepted answers",
    "f1": "SQuAD token-overlap F1 after normalisation, best over accepted answers",
    "json_fields": "JSON field accuracy: matching flattened fields / union of reference and "
    "predicted fields (unparsable = 0)",
    "chrf": "sentence chrF (sacrebleu, character 6-grams, beta 2) scaled to 0..1",
    "mbpp_pass": "1 if the extracted code, run in a sandbox, passes all of the task's asserts (the run must "
    "reach the end of the last one; an early exit fails), else 0",
}

# ---------------------------------------------------------------- short-answer QA

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _answer_list(answers: Any) -> list[str]:
    """Accept a string, list, tuple or numpy array of answers; always return ``list[str]``."""
    if answers is None:
        return []
    if isinstance(answers, str):
        return [answers]
    if hasattr(answers, "tolist"):  # numpy arrays (Parquet via pandas)
        answers = answers.tolist()
    if isinstance(answers, str):
        return [answers]
    try:
        return [str(a) for a in answers]
    except TypeError:  # a lone scalar such as NaN for a missing extra
        return []


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized accepted answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answer_list(answers)))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    # SQuAD convention: an empty side scores 1 only when both are empty.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 between prediction and each accepted answer; the best one counts."""
    pred_tokens = normalize_answer(prediction).split()
    scores = [_f1_one(pred_tokens, normalize_answer(a).split()) for a in _answer_list(answers)]
    return max(scores, default=0.0)


# ---------------------------------------------------------------- structured output

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_json_object(text: str) -> dict | None:
    """Return the first JSON object found in ``text``, or None.

    Tries, in order: the whole text; the contents of fenced blocks (```json first);
    then a parse starting at each ``{`` in the text, which skips leading prose and
    ignores whatever follows the object.
    """
    decoder = json.JSONDecoder()
    text = text.strip()
    candidates = [text]
    fences = _FENCE.findall(text)
    candidates += [body for lang, body in fences if lang.lower() == "json"]
    candidates += [body for lang, body in fences if lang.lower() != "json"]
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _norm_value(value: Any) -> Any:
    """Case- and whitespace-insensitive strings; lists compared element by element."""
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, list):
        return [_norm_value(v) for v in value]
    if isinstance(value, dict):  # only empty dicts reach here (see flatten_json)
        return {}
    return value


def flatten_json(obj: Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten nested objects to dotted keys: ``{"slots": {"city": "X"}}`` -> ``slots.city``.

    Lists and scalars are leaves; an empty nested object is kept as a leaf ``{}`` so that
    it still counts as a field.
    """
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_json(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def json_field_accuracy(prediction: str, reference: str | Mapping) -> float:
    """Field-level accuracy of a predicted JSON object against the reference object.

    Definition: both objects are flattened to dotted keys (:func:`flatten_json`). A field
    matches when its key is in both and the values are equal after normalisation (strings
    lowercased with whitespace collapsed, recursively inside lists; other types compared
    as parsed, so ``"5"`` differs from ``5``). The score is
    ``matched / |reference keys ∪ predicted keys|``: missing fields and extra
    (hallucinated) fields both lower it. Two empty objects score 1.0. A prediction with no
    parsable JSON object scores 0.0. The reference may be JSON text or a mapping; an
    unparsable reference raises ``ValueError`` because it is a data error.
    """
    if isinstance(reference, Mapping):
        ref_obj = dict(reference)
    else:
        ref_obj = extract_json_object(reference)
        if ref_obj is None:
            raise ValueError(f"reference is not a JSON object: {reference[:200]!r}")
    pred_obj = extract_json_object(prediction)
    if pred_obj is None:
        return 0.0
    ref = {k: _norm_value(v) for k, v in flatten_json(ref_obj).items()}
    pred = {k: _norm_value(v) for k, v in flatten_json(pred_obj).items()}
    keys = ref.keys() | pred.keys()
    if not keys:
        return 1.0
    matched = sum(1 for k in ref.keys() & pred.keys() if ref[k] == pred[k])
    return matched / len(keys)


# ---------------------------------------------------------------- free text

_CHRF = None


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF (sacrebleu defaults) scaled from 0..100 to 0..1."""
    global _CHRF
    if _CHRF is None:  # imported lazily: sacrebleu is only needed by this metric
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF()
    return _CHRF.sentence_score(prediction, [reference]).score / 100.0


# ---------------------------------------------------------------- code


def extract_code(text: str) -> str:
    """Code from the first ```python (or ```py) fenced block; else the first untagged
    fence; else the whole text. An unclosed fence (generation cut off) runs to the end."""
    fences = _FENCE.findall(text)
    for lang, body in fences:
        if lang.lower() in ("python", "py", "python3"):
            return body
    for lang, body in fences:
        if not lang:
            return body
    return text


def mbpp_pass(prediction: str, tests: Sequence[str], setup: str = "", timeout: float = 10.0) -> float:
    """1.0 if the code in ``prediction`` passes every assert in ``tests``, else 0.0.

    The extracted code runs as a module (not ``__main__``) in
    :func:`tasc.eval.sandbox.run_sandboxed` with ``timeout`` seconds of wall-clock time,
    then ``setup`` and the asserts in its namespace. A pass needs the sandbox's completion
    token, written only after the last assert: code that exits early (``sys.exit(0)``,
    ``os._exit(0)``, ``unittest.main()``, an ``atexit`` hook) scores 0 whatever its exit
    status.
    """
    test_lines = _answer_list(tests)
    if not test_lines:
        raise ValueError("mbpp_pass needs at least one test")
    checks = "\n\n".join([setup or "", "\n".join(test_lines), ""])
    return 1.0 if run_sandboxed(extract_code(prediction), timeout=timeout, tests=checks).ok else 0.0


# ---------------------------------------------------------------- dispatch


def _text_extra(row: Mapping, key: str) -> str:
    value = row.get(key)
    return value if isinstance(value, str) else ""


def score(metric: str, prediction: str, row: Mapping) -> float:
    """Score ``prediction`` against a corpus ``row`` with the named metric."""
    if metric in ("exact_match", "f1"):
        answers = _answer_list(row.get("answers"))
        if not answers:
            answers = [row["completion"]]
        return exact_match(prediction, answers) if metric == "exact_match" else token_f1(prediction, answers)
    if metric == "json_fields":
        return json_field_accuracy(prediction, row["completion"])
    if metric == "chrf":
        return chrf(prediction, row["completion"])
    if metric == "mbpp_pass":
        return mbpp_pass(prediction, _answer_list(row.get("tests")), setup=_text_extra(row, "test_setup"))
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_DESCRIPTIONS)}")


def score_many(
    metric: str, predictions: Sequence[str], rows: Sequence[Mapping], workers: int = 2
) -> list[float]:
    """Score predictions against rows pairwise, in order.

    ``mbpp_pass`` runs in a thread pool of ``workers`` threads (each test is a
    subprocess, so threads suffice); the other metrics are cheap and run inline.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions but {len(rows)} rows")
    if metric not in METRIC_DESCRIPTIONS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_DESCRIPTIONS)}")
    if metric == "mbpp_pass" and workers > 1 and len(rows) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda pr: score(metric, pr[0], pr[1]), zip(predictions, rows, strict=True)))
    return [score(metric, p, r) for p, r in zip(predictions, rows, strict=True)]
