"""How many threads a decode step may use right now.

A step runs a few hundred short parallel regions, and each ends at a barrier. When another
process keeps the other core busy, the operating system deschedules one of our threads for a
whole time slice now and then, and every region waits for it: two threads then decode many
times slower than one (measurements: docs/performance.md). :class:`ThreadBudget` watches how
busy the machine is apart from this process (``/proc/stat`` against ``/proc/self/stat``, read
at most every ``interval`` seconds) and grants one thread while the other cores are taken, the
requested count otherwise. After an idle spell the window covers all of it (a job that has
ended since, another benchmark): the verdict is taken from it, then checked again soon over a
short window of the present. The thread count never changes a result (tasc's kernels compute
every output the same way on any number of threads), only how fast it comes.
"""

from __future__ import annotations

import os
import time


def _machine_busy() -> float | None:
    """Busy CPU time of the whole machine so far, in clock ticks (None where unknown)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return float(sum(fields[:8]) - idle)


def _own_busy() -> float | None:
    """CPU time of this process (all its threads) and of the child processes it has waited for
    so far, in clock ticks. A child's time counts once it ends: a benchmark that runs another
    engine as a child between its own requests (llama.cpp) does not then see it as a neighbour
    on its next request."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return float(sum(int(v) for v in fields[11:15]))  # utime, stime, cutime, cstime


class ThreadBudget:
    """Grants ``requested`` threads, or one while other processes keep the other cores busy."""

    def __init__(self, interval: float = 0.25, crowded: float = 0.5, stale: float = 1.0, recheck: float = 0.05):
        self.interval = interval  # seconds between looks at the machine
        self.stale = stale  # a window longer than this spans an idle spell
        self.recheck = recheck  # seconds to the next look after one over an idle spell
        self._soon = False
        self.crowded = crowded  # others' load, in cores, above which the machine is taken
        self.cores = os.cpu_count() or 1
        self.taken = False
        self._last = (time.monotonic(), _machine_busy(), _own_busy())

    def others(self) -> float | None:
        """Cores that other processes kept busy since the last look (None where unknown)."""
        now, machine, own = time.monotonic(), _machine_busy(), _own_busy()
        then, machine0, own0 = self._last
        self._last = (now, machine, own)
        if None in (machine, own, machine0, own0) or now <= then:
            return None
        ticks = os.sysconf("SC_CLK_TCK") * (now - then)
        return max(0.0, (machine - machine0) - (own - own0)) / ticks

    def threads(self, requested: int) -> int:
        if requested <= 1 or self.cores <= 1:
            return max(requested, 1)
        since = time.monotonic() - self._last[0]
        if since >= (self.recheck if self._soon else self.interval):
            # A window over an idle spell may hold load that has ended since: look again soon.
            self._soon = since >= self.stale
            load = self.others()
            if load is not None:
                # Another process on at least half a core of the ones we would use: one thread.
                self.taken = load > self.crowded * min(requested - 1, self.cores - 1)
        return 1 if self.taken else requested


BUDGET = ThreadBudget()
