"""Add chosen tokens to a tokenizer and give them embeddings (steps 2 and 3 of a TASC round).

``expand_tokenizer`` adds the tokens that ``tasc.ft.select.select_tokens`` chose as added tokens
of the fast tokenizer and checks that each encodes to its own id and decodes to its exact
text; ``round_trip_report`` checks ``decode(encode(x)) == x`` over a whole corpus;
``resize_and_init`` grows the model's embeddings and sets each new row from its pieces.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import numpy as np

from tasc.ft.select import TokenizerError, _added, _lengths, require_fast


def expand_tokenizer(tokenizer, new_tokens: Sequence[str]):
    """A copy of ``tokenizer`` with ``new_tokens`` added (the input is left unchanged).

    Each new token gets one new id, is used wherever its text occurs when encoding, and
    decodes to exactly its text; a token that would not is reported in a TokenizerError.
    Cleanup of spaces on decode is turned off so ``decode(encode(x)) == x``.
    """
    require_fast(tokenizer)
    tokens = list(new_tokens)
    vocab = tokenizer.get_vocab()
    problems = {t: "empty" for t in tokens if not t}
    problems |= {t: "already in the vocabulary" for t in tokens if t and t in vocab}
    if len(set(tokens)) != len(tokens):
        problems["<duplicates>"] = "a token is listed twice"
    new = copy.deepcopy(tokenizer)
    if not problems:
        new.add_tokens([_added(t) for t in tokens])
        new.clean_up_tokenization_spaces = False
        for t in tokens:
            i = new.convert_tokens_to_ids(t)
            if new.encode(t, add_special_tokens=False) != [i]:
                problems[t] = "does not encode to its own id"
            elif new.decode([i]) != t:
                problems[t] = f"decodes to {new.decode([i])!r}"
    if problems:
        shown = "; ".join(f"{k!r}: {v}" for k, v in list(problems.items())[:10])
        raise TokenizerError(f"{len(problems)} token(s) cannot be added and round-trip exactly: {shown}")
    return new


def base_backend(tokenizer):
    """The backend of ``tokenizer`` without its non-special added tokens (the base vocabulary)."""
    data = json.loads(require_fast(tokenizer).to_str())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("special")]
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(data))


def round_trip_report(tokenizer, texts: Sequence[str], base_tokenizer=None) -> dict:
    """Check ``decode(encode(x)) == x`` for every text.

    Returns ``{"exact": bool, "failures": [indices], "base_tokens": int, "new_tokens": int}``;
    base_tokens counts with ``base_tokenizer`` or, without one, with ``tokenizer`` minus its
    non-special added tokens."""
    texts = list(texts)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    decoded = tokenizer.batch_decode(ids) if texts else []
    failures = [i for i, (a, b) in enumerate(zip(texts, decoded, strict=True)) if a != b]
    base = require_fast(base_tokenizer) if base_tokenizer is not None else base_backend(tokenizer)
    return {
        "exact": not failures,
        "failures": failures,
        "base_tokens": int(_lengths(base, texts).sum()),
        "new_tokens": int(sum(map(len, ids))),
    }


def _piece_weights(k: int, method: str) -> np.ndarray:
    if method == "mean":
        return np.full(k, 1.0 / k)
    if method == "weighted":  # linearly decreasing: the first piece is what the model emits first
        w = np.arange(k, 0, -1, dtype=np.float64)
        return w / w.sum()
    raise ValueError(f"unknown init method {method!r}; use 'mean' or 'weighted'")


def resize_and_init(model, base_tokenizer, new_tokenizer, new_tokens: Sequence[str], method: str = "mean") -> int:
    """Grow the embeddings to the new vocabulary and set each new token's row from the rows of
    its base pieces (``base_tokenizer.encode(token)``): their mean (Fast Vocabulary Transfer)
    or, with ``method="weighted"``, weights k, k-1, ..., 1 favouring the first piece.

    Input embeddings (V, H) and, when untied, output embeddings (V, H) are both set; tied
    weights stay tied. Returns the number of parameters added."""
    import torch

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is None or out.weight.data_ptr() == emb.weight.data_ptr()
    old_rows, hidden = emb.weight.shape
    ids = [new_tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
    pieces = [base_tokenizer.encode(t, add_special_tokens=False) for t in new_tokens]
    bad = [t for t, i, p in zip(new_tokens, ids, pieces, strict=True) if i is None or i < len(base_tokenizer) or not p]
    if bad:
        raise TokenizerError(f"not new tokens of new_tokenizer (or empty): {bad[:10]}")
    rows = max([old_rows, len(new_tokenizer), *(i + 1 for i in ids)])
    if rows > old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    if tied:
        model.tie_weights()
    mats = [model.get_input_embeddings().weight]
    if not tied:
        mats.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for w in mats:
            for i, p in zip(ids, pieces, strict=True):
                weights = torch.as_tensor(_piece_weights(len(p), method), dtype=torch.float32, device=w.device)
                w[i] = (weights[:, None] * w[p].float()).sum(0).to(w.dtype)
    head = model.get_output_embeddings()
    if tied and head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("resizing untied the input and output embeddings")
    return (rows - old_rows) * hidden * len(mats)
