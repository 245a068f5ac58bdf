"""The sandbox's kernel-level guards: no network below the ``socket`` module, no process
that outlives the run, and one address-space limit for the whole run."""

from __future__ import annotations

import platform
import sys
import time

import pytest

from tasc.eval.sandbox import PROCESS_ERROR, run_sandboxed
from tasc.eval.sandbox_child import _SYSCALLS

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() not in _SYSCALLS,
                                reason="the seccomp filter exists for Linux x86-64 and aarch64 only")

# Flushed prints: a program that execs or is killed must not lose what it reported.
PRELUDE = "import ctypes, functools, os, builtins\nprint = functools.partial(builtins.print, flush=True)\n"


def test_network_blocked_below_the_socket_module():
    code = PRELUDE + (
        "import socket, _socket\n"
        "for make in (lambda: socket.socket.__mro__[2](socket.AF_INET, socket.SOCK_STREAM),\n"
        "             lambda: socket.socket.__mro__[2](socket.AF_INET6, socket.SOCK_DGRAM),\n"
        "             lambda: socket.socket.__mro__[2](socket.AF_NETLINK, socket.SOCK_RAW, 0)):\n"
        "    try:\n"
        "        make()\n"
        "    except OSError as exc:\n"
        "        print('blocked', exc.errno)\n"
        "    else:\n"
        "        print('OPEN')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        "print('libc', fd, ctypes.get_errno())\n"
        "unix = socket.socket.__mro__[2](socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "print('unix', unix.family == socket.AF_UNIX)\n"
        # An executed program inherits the filter.
        "import sys\n"
        "os.execv(sys.executable, ['python', '-c', 'import socket; socket.socket(); print(\"OPEN\")'])\n"
    )
    res = run_sandboxed(code, timeout=10)
    lines = res.stdout.splitlines()
    assert lines[:5] == ["blocked 13", "blocked 13", "blocked 13", "libc -1 13", "unix True"], res
    assert "OPEN" not in res.stdout and "PermissionError" in res.stderr, res


@pytest.mark.parametrize("spawn", [
    "import subprocess\nsubprocess.Popen(['/bin/sh', '-c', WRITE_LATER], start_new_session=True)\n",
    "pid = ctypes.CDLL(None).fork()\nif pid == 0:\n    os.setsid()\n    os.execv('/bin/sh', ['sh', '-c', WRITE_LATER])\n"
    "print('fork', pid)\n",
])
def test_no_process_outlives_the_run(tmp_path, spawn):
    marker = tmp_path / "stray.txt"
    code = PRELUDE + f"WRITE_LATER = 'sleep 1; echo alive > {marker}'\n" + spawn
    res = run_sandboxed(code, timeout=5)
    time.sleep(2.5)  # longer than the child's sleep
    assert not marker.exists(), res
    assert PROCESS_ERROR in res.stderr or "fork -1" in res.stdout, res


def test_the_memory_limit_covers_the_whole_run():
    # Forked children would each get their own address-space limit; none can be made.
    code = PRELUDE + (
        "pids = []\n"
        "for _ in range(3):\n"
        "    pid = ctypes.CDLL(None).fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(64 << 20)\n"
        "        import time\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "print(pids)\n"
        "try:\n"
        "    os.fork()\n"
        "except OSError as exc:\n"
        "    print(exc)\n"
        "import threading\n"
        "t = threading.Thread(target=print, args=('thread ran',))\n"
        "t.start()\n"
        "t.join()\n"
    )
    res = run_sandboxed(code, timeout=10)
    assert res.ok, res
    assert res.stdout.splitlines() == ["[-1, -1, -1]", PROCESS_ERROR, "thread ran"]
