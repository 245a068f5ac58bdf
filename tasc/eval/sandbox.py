"""Run untrusted generated Python in a constrained subprocess.

Used by the ``mbpp_pass`` metric: model output is executed, then the task's asserts. The
guard rails are the ones an unprivileged process can set up on its own:

* ``sys.executable -I`` (isolated mode: no user site, no ``PYTHON*`` variables, no
  script folder on ``sys.path``) in a fresh temporary folder used as the working dir;
* a minimal environment (no proxy settings, ``HOME`` pointing at the temp folder);
* ``resource`` limits applied before ``exec``: address space, CPU seconds, no core
  files, a file-size cap (stdout/stderr go to files, so the cap also bounds output);
* on Linux x86-64 and aarch64, a seccomp filter installed before the program runs
  (:mod:`tasc.eval.sandbox_child`): ``socket()`` fails for every family but ``AF_UNIX``,
  so no IP, netlink or raw socket can be opened, through ``socket``, ``_socket``,
  ``ctypes`` or an executed binary alike; and no new process can be created (``fork``,
  ``vfork`` and non-thread ``clone`` fail), so the address-space limit bounds the whole
  run and nothing can outlive it. Threads still work. Python-level stubs give these
  refusals a clear message (:data:`NETWORK_ERROR`, :data:`PROCESS_ERROR`);
* its own process group, killed as a whole on timeout and after exit;
* a completion token: a random token sent on stdin is written to a file by the launcher
  only after the program (and the tests, when given) ran to their end, and ``ok``
  requires it, so a program that exits early with status 0 does not pass.

Where seccomp is unavailable (another OS or architecture, or a kernel without it) the
child says so on stderr and only the Python-level stubs apply: they stop ordinary code but
not code written to get around them, and a child process could then outlive the run. Even
with the filter this is not a security boundary: ``AF_UNIX`` sockets reach local services,
files the user can write are writable, and the token can be read from the child's memory
by code written to find it. Use a container or a VM for hostile code.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasc.eval.sandbox_child import NETWORK_ERROR, PROCESS_ERROR

__all__ = ["NETWORK_ERROR", "PROCESS_ERROR", "SandboxResult", "run_sandboxed"]

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB of address space
DEFAULT_FILE_BYTES = 16 << 20  # per written file, stdout/stderr included
DEFAULT_MAX_OUTPUT = 64 << 10  # characters of stdout/stderr kept in the result

_CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``completed``: the program (and the tests, when given) ran to their end, proven by the
    run's token. ``ok``: completed, exit status 0 and within the time limit; an early
    ``sys.exit(0)`` or ``os._exit(0)`` exits 0 but is not ok.
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    completed: bool = False


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


def _has_token(path: Path, token: bytes) -> bool:
    """Whether ``path`` is a regular file holding exactly ``token`` (read with a bound: the
    program may have put something else there)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return hmac.compare_digest(fh.read(len(token) + 1), token)
    except OSError:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(
    code: str,
    timeout: float = 10.0,
    *,
    tests: str | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    file_bytes: int = DEFAULT_FILE_BYTES,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> SandboxResult:
    """Run ``code`` in a sandboxed Python subprocess, then ``tests`` if given.

    Args:
        code: Python source to execute: as ``__main__`` without ``tests``; with them, as
            the module ``solution``, so its ``if __name__ == "__main__":`` block is skipped.
        timeout: wall-clock seconds before the whole process group is killed; the CPU
            limit is set a little above it as a backstop.
        tests: Python source (asserts) run after ``code`` in its namespace.
        memory_bytes: address-space limit (``RLIMIT_AS``).
        file_bytes: largest file the program may write, stdout and stderr included.
        max_output: characters of stdout/stderr kept in the result.

    Returns:
        A :class:`SandboxResult`; ``returncode`` is negative when killed by a signal.
    """
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="tasc-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        args = [sys.executable, "-I", str(_CHILD), str(work / "_done"), str(work / "program.py")]
        (work / "program.py").write_text(code.replace("\r\n", "\n"), encoding="utf-8")
        if tests is not None:
            (work / "tests.py").write_text(tests.replace("\r\n", "\n"), encoding="utf-8")
            args.append(str(work / "tests.py"))
        out_path, err_path = work / "_stdout.txt", work / "_stderr.txt"
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                args,
                cwd=tmp,
                env=_env(tmp),
                stdin=subprocess.PIPE,  # carries the token; the child then swaps in /dev/null
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group, so one killpg reaches children
                preexec_fn=_limits(timeout, memory_bytes, file_bytes),
                close_fds=True,
            )
            try:
                for send in (lambda: proc.stdin.write(token), proc.stdin.close):
                    with contextlib.suppress(BrokenPipeError):  # the child died before reading it
                        send()
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a normal exit: no background child may outlive the run (where the
                # kernel filter holds there can be none; elsewhere this reaches the group).
                _kill_group(proc.pid)
                proc.wait()
        stdout = _read(out_path, max_output)
        stderr = _read(err_path, max_output)
        completed = _has_token(work / "_done", token)
    returncode = proc.returncode
    return SandboxResult(
        ok=(completed and returncode == 0 and not timed_out),
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        completed=completed,
    )
