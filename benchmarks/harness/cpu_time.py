"""CPU time the watched processes have used (psutil, read from outside)."""

try:
    import psutil
except ImportError:  # selfcheck.py imports the measurements without it
    psutil = None

from harness import BenchError


def cpu_seconds(*processes):
    """
    User + system CPU seconds used so far by C{processes} (psutil
    processes), together.  L{BenchError} if one has exited: a figure
    without it would be wrong, not smaller.
    """
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error as e:
            raise BenchError("the CPU time of pid %d cannot be read: %s" % (process.pid, e))
        total += times.user + times.system
    return total
