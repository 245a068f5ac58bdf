"""Lossless GPT-2 style pre-tokenization of task texts: the pieces text-level n-grams are made
of (tasc.ngrams.counts). ``split_words`` is the reference, one regex; ``encode_texts`` computes
the same split for many texts at once on code-point arrays and maps the pieces to ids."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# GPT-2's pattern in stdlib ``re`` terms: [^\W\d_] is "letter", (?:[^\s\w]|_) "neither letter,
# digit nor space". Every character is whitespace, \w or [^\s\w], and every alternative
# consumes at least one character, so findall never skips text: the split is lossless.
_WORD_RE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def split_words(text: str) -> list[str]:
    """Lossless GPT-2 style pre-tokenization: optional leading space + letters, + digits,
    + other symbols, whitespace runs. ``"".join(split_words(text)) == text``."""
    return _WORD_RE.findall(text)


def _char_class(ch: str) -> int:
    # The same classes as _WORD_RE, so the vectorised split cannot drift from it.
    return 0 if _SPACE.match(ch) else 1 if _LETTER.match(ch) else 2 if _DIGIT.match(ch) else 3


_SPACE, _LETTER, _DIGIT = re.compile(r"\s"), re.compile(r"[^\W\d_]"), re.compile(r"\d")
_ASCII_CLASS = np.array([_char_class(chr(c)) for c in range(128)], np.uint8)


def _classify(cp: np.ndarray) -> np.ndarray:
    """uint8 (C,): 0 space, 1 letter, 2 digit, 3 other, per code point."""
    cls = np.empty(cp.size, np.uint8)
    low = cp < 128
    cls[low] = _ASCII_CLASS[cp[low]]
    if not low.all():  # classify each distinct non-ASCII code point once
        uniq, inv = np.unique(cp[~low], return_inverse=True)
        cls[~low] = np.array([_char_class(chr(c)) for c in uniq.tolist()], np.uint8)[inv]
    return cls


def encode_texts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Split texts into pre-tokens and map them to ids, without a Python object per piece.

    Returns ``ids`` int32 (T,), ``offsets`` int64 (D+1,) and ``vocab`` (pa.string,
    V, first-seen order) such that ``vocab[ids[offsets[d]:offsets[d+1]]]`` equals
    ``split_words(texts[d])``. Boundaries are those of ``_WORD_RE``, computed on code
    points: class changes, then its whitespace and contraction rules.
    """
    joined = "".join(texts)
    try:
        raw = joined.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: Arrow strings are UTF-8
        raise ValueError(f"texts must be valid Unicode, decode them with errors='replace': {e}") from None
    cp = np.frombuffer(joined.encode("utf-32-le"), np.uint32)
    c = cp.size
    char_off = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)), out=char_off[1:])
    doc_start = np.zeros(c + 2, bool)  # two spare slots so i+1 and i+2 lookups stay in range
    doc_start[char_off] = True
    doc_start[c + 1] = True
    cls = _classify(cp)
    b = np.ones(c, bool)  # b[i]: a piece starts at i
    np.not_equal(cls[1:], cls[:-1], out=b[1:])
    b |= doc_start[:c]
    # "\s+(?!\S)": a whitespace run followed, in the same text, by a non-space character
    # leaves its last character out; that character joins the next piece when it is " ".
    j = np.flatnonzero((cls[1:] != 0) & (cls[:-1] == 0)) + 1
    j = j[~doc_start[j]]
    b[j - 1] = True
    b[j[cp[j - 1] == 32]] = False
    # "'(?:[sdmt]|ll|ve|re)" wins only where a match starts at the apostrophe.
    q = np.flatnonzero((cp == 39) & b)
    q = q[~doc_start[q + 1]]
    padded = np.append(cp, np.zeros(2, np.uint32))
    c1, c2 = padded[q + 1], np.where(doc_start[q + 2], 0, padded[q + 2])
    one = np.isin(c1, [ord(x) for x in "sdmt"])
    two = ~one & (
        ((c1 == ord("l")) & (c2 == ord("l"))) | (np.isin(c1, [ord("v"), ord("r")]) & (c2 == ord("e")))
    )
    for k, hit in ((2, one), (3, two)):
        b[q[hit] + 1] = False
        end = q[hit] + k
        b[end[end < c]] = True
    starts = np.flatnonzero(b)
    # Byte offset = code-point offset + extra UTF-8 bytes of the non-ASCII code points before
    # it; summed over the (usually few) non-ASCII ones only.
    wide = np.flatnonzero(cp >= 0x80)
    extra = np.zeros(wide.size + 1, np.int64)
    np.cumsum(1 + (cp[wide] >= 0x800) + (cp[wide] >= 0x10000), out=extra[1:])
    at = np.append(starts, c)
    bounds = at + extra[np.searchsorted(wide, at)]
    flat = pa.LargeStringArray.from_buffers(starts.size, pa.py_buffer(bounds), pa.py_buffer(raw))
    enc = pc.dictionary_encode(flat)
    ids = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return ids, np.searchsorted(starts, char_off).astype(np.int64), enc.dictionary.cast(pa.string())
