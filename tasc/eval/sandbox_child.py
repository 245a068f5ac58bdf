"""The program the sandboxed interpreter runs first (see :mod:`tasc.eval.sandbox`).

Invoked as ``python -I sandbox_child.py DONE PROGRAM [TESTS]`` with the run's token on
stdin. It reads the token and points stdin at ``/dev/null``, turns off process creation
and network sockets (:func:`lock_down`), then runs ``PROGRAM``: as ``__main__`` when there
are no tests, otherwise as the module ``solution`` (so an ``if __name__ == "__main__":``
block does not run) followed by ``TESTS`` in the same namespace. Only when all of that
returned does it write the token to the file ``DONE``, which the parent compares with the
token it sent: a program that leaves early (``sys.exit``, ``os._exit``, an ``atexit`` hook,
``unittest.main()``) never reaches that line, whatever its exit status.

The token stays in this process's memory while the program runs, so code written to dig
it out (through frames or ``gc``) could forge a pass; the token guards against programs
that end early, not against deliberate forgery. Standard library only: ``-I`` keeps the
project off ``sys.path``.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import platform
import struct
import sys
import types

NETWORK_ERROR = "network disabled in sandbox"
PROCESS_ERROR = "process creation disabled in sandbox"

# Per architecture: the audit value seccomp reports, and the syscall numbers filtered.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "clone": 56, "fork": 57, "vfork": 58, "clone3": 435,
                            "io_uring_setup": 425}),
    "aarch64": (0xC00000B7, {"socket": 198, "clone": 220, "clone3": 435, "io_uring_setup": 425}),
}
_AF_UNIX, _CLONE_THREAD = 1, 0x00010000
_X32_BIT = 0x40000000  # x86-64 syscalls made through the x32 ABI carry this bit


def _seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """A classic-BPF seccomp filter as (code, jump-if-true, jump-if-false, k) rows.

    Refused: sockets of any family but ``AF_UNIX`` (EACCES); ``fork``, ``vfork`` and a
    ``clone`` without ``CLONE_THREAD`` (EPERM), so no new process can exist; ``clone3``
    (ENOSYS: glibc then creates threads with ``clone``, whose flags a filter can read);
    ``io_uring_setup`` (io_uring can open sockets without the ``socket`` call); and every
    syscall made through another ABI (x32, 32-bit), whose numbers differ.
    """
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|K ops, BPF_RET|K
    allow = 0x7FFF0000

    def deny(err: int) -> int:
        return 0x00050000 | err  # SECCOMP_RET_ERRNO

    audit, nr = _SYSCALLS[machine]
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit), (ret, 0, 0, deny(errno.EPERM)), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(jge, 0, 1, _X32_BIT), (ret, 0, 0, deny(errno.EPERM))]
    for name, err in (("fork", errno.EPERM), ("vfork", errno.EPERM), ("clone3", errno.ENOSYS),
                      ("io_uring_setup", errno.EPERM)):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, deny(err))]
    # args[0] (its low 32 bits) sits at offset 16 of struct seccomp_data on both arches.
    prog += [(jeq, 0, 4, nr["socket"]), (ld, 0, 0, 16), (jeq, 0, 1, _AF_UNIX), (ret, 0, 0, allow),
             (ret, 0, 0, deny(errno.EACCES))]
    prog += [(jeq, 0, 4, nr["clone"]), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_THREAD), (ret, 0, 0, allow),
             (ret, 0, 0, deny(errno.EPERM))]
    return prog + [(ret, 0, 0, allow)]


def install_kernel_filter() -> str | None:
    """Install the seccomp filter; returns None, or why it could not be installed.

    A seccomp filter cannot be removed and is inherited across ``exec``, so neither the
    program nor anything it executes gets around it.
    """
    machine = platform.machine()
    if sys.platform != "linux" or machine not in _SYSCALLS:
        return f"no seccomp filter for {sys.platform}/{machine}"
    rows = _seccomp_program(machine)
    code = b"".join(struct.pack("=HBBI", *row) for row in rows)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(rows), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS (38) lets an unprivileged process install a filter;
    # PR_SET_SECCOMP (22) with SECCOMP_MODE_FILTER (2) installs it.
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        return f"seccomp unavailable: {os.strerror(ctypes.get_errno())}"
    return None


def _install_stubs() -> None:
    """Python-level stand-ins that fail with a clear message; the kernel filter is what
    actually holds (these alone are bypassed by ``_socket`` types or ``ctypes``)."""
    import _socket
    import posix
    import socket
    import subprocess

    def no_network(*args, **kwargs):
        raise OSError(NETWORK_ERROR)

    def no_process(*args, **kwargs):
        raise PermissionError(PROCESS_ERROR)

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError(NETWORK_ERROR)

    socket.socket = socket.SocketType = _socket.socket = BlockedSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, no_network)
        if hasattr(_socket, name):
            setattr(_socket, name, no_network)
    for mod in (os, posix):
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(mod, name):
                setattr(mod, name, no_process)
    subprocess.Popen._execute_child = no_process


def _read_token() -> bytes:
    """The token from stdin; stdin then reads ``/dev/null`` so the program cannot see it."""
    token = b""
    while len(token) < 256:
        chunk = os.read(0, 256)
        if not chunk:
            break
        token += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return token


def lock_down() -> None:
    """Kernel filter first (warn on stderr where there is none), then the stubs."""
    why = install_kernel_filter()
    if why:
        print(f"sandbox: {why}; only Python-level network and process stubs apply", file=sys.stderr)
    _install_stubs()


def _source(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def main() -> None:
    done, program, tests = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    token = _read_token()
    lock_down()
    # Own references, taken before the program runs: it may rebind builtins and os.
    run, os_open, os_write, os_close, os_exit = builtins.exec, os.open, os.write, os.close, os._exit
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    # optimize=0 keeps the asserts whatever the interpreter flags.
    code = compile(_source(program), program, "exec", dont_inherit=True, optimize=0)
    checks = compile(_source(tests), tests, "exec", dont_inherit=True, optimize=0) if tests else None
    module = types.ModuleType("__main__" if checks is None else "solution")
    module.__file__ = program
    sys.modules[module.__name__] = module
    sys.argv = [program]
    run(code, module.__dict__)
    if checks is not None:
        run(checks, module.__dict__)
    fd = os_open(done, flags, 0o600)
    os_write(fd, token)
    os_close(fd)
    if checks is None:
        return  # a plain program ends as scripts do (threads joined, atexit hooks run)
    # Tests: the verdict is in; nothing the program left behind (threads, atexit hooks)
    # may change the exit status or hold the run until its timeout.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # a replaced or closed stream; its output is the program's problem
            pass
    os_exit(0)


if __name__ == "__main__":
    main()
