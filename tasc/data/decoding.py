"""Decoding source files: bytes to text under the spec's ``encoding`` / ``errors``.

Files are read as bytes and decoded here, not by ``open``: under ``strict`` a bad byte
stops the read naming file and byte offset; under a lenient mode each replacement is
bracketed by markers so the records holding one can be counted, then :func:`unmark`
removes them.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

# Noncharacters (reserved for internal use by Unicode) bracket each replacement made while
# decoding, so the records holding one can be counted; they are removed before use.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


class ReaderError(ValueError):
    """A source that cannot be read at all; the message names the file and what to change."""


def _marking_handler(mode: str) -> str:
    """Register (once) an error handler that wraps ``mode``'s replacement in markers."""
    name = f"tasc-marked-{mode}"
    try:
        codecs.lookup_error(name)
    except LookupError:
        inner = codecs.lookup_error(mode)

        def handler(exc: UnicodeError) -> tuple[str, int]:
            text, end = inner(exc)
            return _OPEN + text + _CLOSE, end

        codecs.register_error(name, handler)
    return name


def _decode_message(path: str, data: bytes, e: UnicodeDecodeError, encoding: str) -> str:
    offset = e.start + len(data) - len(e.object)  # utf-8-sig reports offsets after the BOM
    line = data.count(b"\n", 0, offset) + 1
    return (
        f"{path}: byte 0x{data[offset]:02x} at offset {offset} (line {line}) is not valid "
        f"{encoding} ({e.reason}). Set `errors: replace` (or ignore / backslashreplace) under "
        "`source:` in the spec to read the file anyway; affected rows are counted in the manifest"
    )


def decode_file(path: str, encoding: str, errors: str) -> tuple[str, bool]:
    """The text of a file and whether any bytes were replaced (marked) while decoding."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ReaderError(f"{path}: cannot read: {e.strerror}") from None
    try:
        # utf-8-sig drops a leading BOM (not content, and json.loads rejects it).
        codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        if errors == "strict":
            return data.decode(codec), False
        text = data.decode(codec, _marking_handler(errors))
    except UnicodeDecodeError as e:
        raise ReaderError(_decode_message(path, data, e, encoding)) from None
    except LookupError as e:
        raise ReaderError(f"{path}: {e} (source.encoding / source.errors)") from None
    return text, _OPEN in text


def unmark(value: Any) -> tuple[Any, int]:
    """Remove the replacement markers from parsed data; returns it and the marker count."""
    if isinstance(value, str):
        n = value.count(_OPEN)
        return (value.replace(_OPEN, "").replace(_CLOSE, "") if n else value), n
    if isinstance(value, list):
        pairs = [unmark(v) for v in value]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    if isinstance(value, dict):
        out, total = {}, 0
        for k, v in value.items():
            (k2, n1), (v2, n2) = unmark(k), unmark(v)
            out[k2], total = v2, total + n1 + n2
        return out, total
    return value, 0
