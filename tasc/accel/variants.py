"""The quantised kernel library (kernels/quant.c) and the instruction-set variant it runs here.

The variant is chosen at run time (:func:`isa`, for reports): the first of vnni (AVX-512 VNNI),
avxvnni, avx2 and ref (portable C) whose CPU flags are present and whose self-test passes in a
child process, so a CPU or VM that advertises an instruction set it does not run kills the
child, not this process. ``TASC_QUANT_ISA=ref|avx2|avxvnni|vnni`` forces one (read at the first
product; ``isa=`` forces one for a single call). Without a C compiler (or with
``TASC_NATIVE=0``) :func:`available` is False.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from functools import cache

from tasc.accel import native

ISAS = ("ref", "avx2", "avxvnni", "vnni")  # the kernel's variant ids are the indices
PREFERENCE = ("vnni", "avxvnni", "avx2", "ref")
CPU_NEEDS = {"ref": (), "avx2": ("avx2", "fma", "f16c"), "avxvnni": ("avx2", "fma", "f16c", "avx_vnni"),
             "vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c")}
ERRORS = {-1: "K must be a positive multiple of 32", -2: "unsupported tensor type",
          -3: "variant not compiled in", -4: "out of memory"}
PROBE = "import ctypes, sys; sys.exit(ctypes.CDLL(sys.argv[1]).tasc_quant_selftest(int(sys.argv[2])))"


@cache
def library():
    """The kernel library (ctypes), or None without a C compiler (or with TASC_NATIVE=0)."""
    lib = native.load("quant")
    if lib is None:
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.tasc_quant_matmul, lib.tasc_quant_argmax):
        fn.argtypes = [i32, i32, ptr, i32, i32, ptr, ptr, i32, ptr, i32]
        fn.restype = i32
    lib.tasc_quant_isas.restype = i32
    return lib


def available() -> bool:
    return library() is not None


@cache
def probe(name: str) -> bool:
    """True when variant ``name`` is compiled in and its self-test (bitwise equal to ref)
    passes in a child process on this CPU."""
    lib = library()
    if lib is None or not lib.tasc_quant_isas() >> ISAS.index(name) & 1:
        return False
    if name == "ref":
        return True
    if not sys.executable:  # embedded without an interpreter to start: only the portable code
        return False
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(native.build("quant")), str(ISAS.index(name))],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@cache
def _choose(forced: str | None) -> str | None:
    if forced:
        if forced not in ISAS:
            raise ValueError(f"TASC_QUANT_ISA={forced!r}: expected one of {', '.join(ISAS)}")
        if not probe(forced):
            raise RuntimeError(f"quantised kernel variant {forced!r} does not run here")
        return forced
    if library() is None:
        return None
    flags = native.cpu_flags()
    return next(n for n in PREFERENCE if set(CPU_NEEDS[n]) <= flags and probe(n))


def isa(requested: str | None = None) -> str | None:
    """The variant the kernels run (``requested``, else ``TASC_QUANT_ISA``, else the best that
    passes its probe); None without the kernel library."""
    return _choose(requested or os.environ.get("TASC_QUANT_ISA") or None)


@cache
def default_id() -> int:
    """The variant of calls without ``isa=``: :func:`isa` at the first such call."""
    return ISAS.index(isa())
