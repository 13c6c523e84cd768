"""CPU time the watched processes have used (psutil, read from outside)."""

import contextlib

try:
    import psutil
except ImportError:  # selfcheck.py imports the measurements without it
    psutil = None


def cpu_seconds(*processes):
    """
    User + system CPU seconds used so far by C{processes} (psutil
    processes), together.  One that has exited counts nothing.
    """
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total
