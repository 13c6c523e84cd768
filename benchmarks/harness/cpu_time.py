"""CPU time the watched processes have used (psutil, read from outside)."""

import contextlib

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


def serving_processes(processes, serving):
    """
    C{{path: {name: psutil process}}} for C{serving} (C{{path: (the harness's
    names of the processes serving it)}}), those running; empty without psutil.
    """
    found = {path: {} for path in serving}
    if psutil is None:
        return found
    for path, names in serving.items():
        for name in names:
            with contextlib.suppress(KeyError, psutil.Error):
                found[path][name] = psutil.Process(processes.procs[name].pid)
    return found


def cpu_now(watched):
    """C{{name: CPU seconds so far}} of the C{watched} processes still running."""
    now = {}
    for name, process in watched.items():
        with contextlib.suppress(BenchError):
            now[name] = cpu_seconds(process)
    return now
