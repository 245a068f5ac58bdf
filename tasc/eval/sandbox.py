"""Run untrusted generated Python in a constrained subprocess.

Used by the ``mbpp_pass`` metric: model output is executed together with the task's
asserts. The guard rails are the ones an unprivileged process can set up on its own:

* ``sys.executable -I`` (isolated mode: no user site, no ``PYTHON*`` variables, no
  script folder on ``sys.path``) in a fresh temporary folder used as the working dir;
* a minimal environment (no proxy settings, ``HOME`` pointing at the temp folder);
* ``resource`` limits applied before ``exec``: address space, CPU seconds, no core
  files, a file-size cap (stdout/stderr go to files, so the cap also bounds output);
* its own process group, killed as a whole on timeout and after exit so stray children
  do not outlive the run;
* a prelude that replaces ``socket.socket``, ``socket.create_connection`` and DNS lookup
  with functions raising ``OSError("network disabled in sandbox")``.

This stops accidental damage (endless loops, memory bombs, stray network calls) from
ordinary generated code. It is not a security boundary against code written to escape:
``ctypes`` or a spawned ``curl`` could still reach the network. Use a container or a VM
for that.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "run_sandboxed", "NETWORK_ERROR"]

NETWORK_ERROR = "network disabled in sandbox"

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB of address space
DEFAULT_FILE_BYTES = 16 << 20  # per written file, stdout/stderr included
DEFAULT_MAX_OUTPUT = 64 << 10  # characters of stdout/stderr kept in the result

# Runs inside the child before the program; runpy then gives the program a fresh
# ``__main__`` namespace, so none of these names leak into it.
_PRELUDE = f"""\
import socket as _socket_mod
import _socket as _csocket

_MSG = {NETWORK_ERROR!r}


def _blocked(*args, **kwargs):
    raise OSError(_MSG)


class _BlockedSocket(_socket_mod.socket):
    def __init__(self, *args, **kwargs):
        raise OSError(_MSG)


_socket_mod.socket = _BlockedSocket
_socket_mod.SocketType = _BlockedSocket
_csocket.socket = _BlockedSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd",
              "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(_socket_mod, _name, _blocked)
    if hasattr(_csocket, _name):
        setattr(_csocket, _name, _blocked)

import runpy as _runpy

_runpy.run_path("program.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``ok`` means exit status 0 within the time limit."""

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


def _limits(timeout: float, memory_bytes: int, file_bytes: int):
    """Build the ``preexec_fn`` that lowers resource limits in the forked child.

    Everything is computed here, in the parent, so the child runs only a few C-level
    ``setrlimit`` calls between fork and exec (the window in which running Python code
    is unsafe when the parent has threads, as ``score_many`` does).
    """
    import resource

    cpu = max(1, math.ceil(timeout)) + 1
    plan = [
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, file_bytes),
    ]
    plan = [(res, _capped(resource.getrlimit(res), value)) for res, value in plan]
    setrlimit = resource.setrlimit

    def preexec() -> None:
        for res, pair in plan:
            setrlimit(res, pair)

    return preexec


def _capped(current: tuple[int, int], value: int) -> tuple[int, int]:
    """Return (soft, hard) no higher than the current hard limit (raising it would fail)."""
    import resource

    hard = current[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    return (value, value)


def _env(home: str) -> dict[str, str]:
    """A minimal environment: built from scratch so no proxy or credential leaks in."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        # Keep numeric libraries from spawning a thread per core on a shared machine.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(
    code: str,
    timeout: float = 10.0,
    *,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    file_bytes: int = DEFAULT_FILE_BYTES,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed Python subprocess.

    Args:
        code: Python source to execute.
        timeout: wall-clock seconds before the whole process group is killed; the CPU
            limit is set a little above it as a backstop.
        memory_bytes: address-space limit (``RLIMIT_AS``).
        file_bytes: largest file the program may write, stdout and stderr included.
        max_output: characters of stdout/stderr kept in the result.

    Returns:
        A :class:`SandboxResult`; ``returncode`` is negative when killed by a signal.
    """
    with tempfile.TemporaryDirectory(prefix="tasc-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(code.replace("\r\n", "\n"), encoding="utf-8")
        launcher = work / "_launcher.py"
        launcher.write_text(_PRELUDE, encoding="utf-8")
        out_path, err_path = work / "_stdout.txt", work / "_stderr.txt"
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(launcher)],
                cwd=tmp,
                env=_env(tmp),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group, so one killpg reaches children
                preexec_fn=_limits(timeout, memory_bytes, file_bytes),
                close_fds=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a normal exit: background children must not outlive the run.
                _kill_group(proc.pid)
                proc.wait()
        stdout = _read(out_path, max_output)
        stderr = _read(err_path, max_output)
    returncode = proc.returncode
    return SandboxResult(
        ok=(returncode == 0 and not timed_out),
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
    )
