"""Small C kernels compiled on first use (tasc/accel/kernels/*.c) and loaded with ctypes.

Each kernel is one self-contained C file whose header states its contract. It is compiled
with the system C compiler (``CC``, else ``cc``/``gcc``) into the kernel cache
(``TASC_KERNEL_CACHE``, default ``~/.cache/tasc/kernels``) under a name keyed by the source
and flags, so an edited kernel is rebuilt and concurrent processes never load half a file.
Every caller keeps a pure numpy/torch path: :func:`load` returns None without a compiler,
on a CPU without the flags' instruction sets, or with ``TASC_NATIVE=0``."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

KERNELS = Path(__file__).with_name("kernels")
# Each kernel's compiler flags and the CPU flags (as in /proc/cpuinfo) its code needs.
FLAGS: dict[str, tuple[str, ...]] = {
    "small_gemm": ("-O3", "-mavx2", "-mfma", "-ffp-contract=fast", "-fopenmp"),
    "draft": ("-O2",),
    # Every variant of the quantised kernels, each function built for its own instruction set
    # (target attributes): the library loads anywhere and tasc.accel.quant probes the variants.
    "quant": ("-O3", "-ffp-contract=off", "-fopenmp"),
    # Quantising and laying out weights at load: plain C, the float operations as written.
    "quant_load": ("-O3", "-ffp-contract=off", "-fopenmp", "-lm"),
    "decoder": ("-O2", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"),
    # The same source for CPUs without AVX2 (ARM among them): the same results, bitwise.
    "decoder_portable": ("-O2", "-DTASC_PORTABLE", "-ffp-contract=off", "-fopenmp", "-lm"),
}
NEEDS: dict[str, tuple[str, ...]] = {"small_gemm": ("avx2", "fma"), "draft": (), "quant": (), "quant_load": (),
                                     "decoder": ("avx2", "fma"), "decoder_portable": ()}
FILES = {"decoder_portable": "decoder"}  # builds of another kernel's source
# The sources as they were when this process imported tasc: the ctypes signatures in the
# Python modules of the same moment match them, even if the files change while it runs.
SOURCES: dict[str, bytes] = {name: (KERNELS / f"{FILES.get(name, name)}.c").read_bytes() for name in FLAGS}


def cache_dir() -> Path:
    return Path(os.environ.get("TASC_KERNEL_CACHE") or Path.home() / ".cache" / "tasc" / "kernels")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(name: str) -> Path | None:
    """Compile ``kernels/<name>.c`` into the cache unless it is there; the library's path, or
    None without a compiler (or when it fails). Does not check the CPU: images build here."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source, flags = SOURCES[name], FLAGS[name]
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{key}.so"
    if lib.exists():
        return lib
    if cc is None:
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    with tempfile.TemporaryDirectory() as work:
        src = Path(work) / f"{FILES.get(name, name)}.c"
        src.write_bytes(source)
        libs = [f for f in flags if f.startswith("-l")]  # after the source, or the linker drops them
        done = subprocess.run([cc, *(f for f in flags if f not in libs), "-fPIC", "-shared", "-o", tmp, str(src), *libs],
                              capture_output=True)
    if done.returncode != 0:
        os.unlink(tmp)
        return None
    os.chmod(tmp, 0o755)
    os.replace(tmp, lib)  # atomic: a concurrent build never exposes half a library
    return lib


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``kernels/<name>.c``, or None where it cannot run here."""
    if os.environ.get("TASC_NATIVE", "1") == "0" or not set(NEEDS[name]) <= cpu_flags():
        return None
    lib = build(name)
    try:
        return ctypes.CDLL(str(lib)) if lib else None
    except OSError:  # e.g. an image without the OpenMP runtime: the fallback path runs
        return None


MADV_DONTNEED, MADV_HUGEPAGE, MADV_PAGEOUT = 4, 14, 21  # Linux's advice values


@cache
def _libc():
    import ctypes.util

    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "madvise") else None


def madvise(address: int, size: int, advice: int) -> bool:
    """The C library's ``madvise`` on the pages of [address, address + size) (address
    page-aligned); False where there is none or the kernel refuses the advice (not Linux,
    MADV_PAGEOUT before Linux 5.4, transparent huge pages off)."""
    lib = _libc()
    return lib is not None and lib.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), advice) == 0


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere): buffers freed in the middle of the heap otherwise stay resident."""
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(ctypes.c_size_t(0))


if __name__ == "__main__":  # python -m tasc.accel.native: build every kernel (container images do)
    for kernel in FLAGS:
        print(kernel, build(kernel) or "not built: no C compiler")
