"""
Processes on CPU budgets of their own, as if each ran on a machine of its own.

On one small machine every process of a measured path shares the same cores,
so a path's speed follows the CPU of all its processes together.  Between
real machines it follows the busiest one.  A CPU quota per process (a cgroup
of its own, ``fraction`` of a core each, all of them together at most the
machine) measures that case: each process gets its share, no more, and
waits for no other.

Needs root and the cgroup ``cpu`` controller (v1 ``cpu.cfs_quota_us`` or v2
``cpu.max``); L{available} says whether this machine has them.
"""

import contextlib
import os

CGROUP_ROOT = "/sys/fs/cgroup"
V1_CPU = os.path.join(CGROUP_ROOT, "cpu")
# A short period: a process that used up its quota waits at most this long,
# which keeps a TCP stream between budgeted processes smooth.
PERIOD_US = 10000


def _version():
    if os.path.exists(os.path.join(V1_CPU, "cpu.cfs_quota_us")):
        return 1
    controllers = os.path.join(CGROUP_ROOT, "cgroup.controllers")
    if os.path.exists(controllers):
        with open(controllers) as f:
            if "cpu" in f.read().split():
                return 2
    return None


def available():
    """Whether budgets can be set here (the controller is there and we may write it)."""
    version = _version()
    if version is None or os.geteuid() != 0:
        return False
    return os.access(V1_CPU if version == 1 else CGROUP_ROOT, os.W_OK)


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _own_group(pid, version):
    """The cgroup directory C{pid} is in now (to move it back to)."""
    with open("/proc/%d/cgroup" % (pid,)) as f:
        for line in f:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 2 and number == "0":
                return os.path.join(CGROUP_ROOT, path.lstrip("/"))
            if version == 1 and "cpu" in controllers.split(","):
                return os.path.join(V1_CPU, path.lstrip("/"))
    return V1_CPU if version == 1 else CGROUP_ROOT


@contextlib.contextmanager
def cpu_budgets(pids, fraction):
    """
    Run the body with each process of C{pids} ({name: pid}) in a cgroup of its
    own, limited to C{fraction} of one core; each goes back where it was after.
    """
    version = _version()
    base = V1_CPU if version == 1 else CGROUP_ROOT
    if version == 2:
        _write(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "+cpu")
    quota = max(1000, int(PERIOD_US * fraction))
    made = []
    try:
        for name, pid in pids.items():
            group = os.path.join(base, "anyproxy-bench-%s-%d" % (name, os.getpid()))
            os.makedirs(group, exist_ok=True)
            made.append((group, pid, _own_group(pid, version)))
            if version == 1:
                _write(os.path.join(group, "cpu.cfs_period_us"), PERIOD_US)
                _write(os.path.join(group, "cpu.cfs_quota_us"), quota)
            else:
                _write(os.path.join(group, "cpu.max"), "%d %d" % (quota, PERIOD_US))
            _write(os.path.join(group, "cgroup.procs"), pid)
        yield
    finally:
        for group, pid, home in made:
            try:
                _write(os.path.join(home, "cgroup.procs"), pid)
            except OSError:
                pass  # the process is gone
            try:
                os.rmdir(group)
            except OSError:
                pass


def budgeted_rounds(rounds, paths, pids_of, fraction, measure):
    """
    C{{path: [measure(path) per round]}}, each run with the processes of
    C{pids_of(path)} ({name: pid}) on budgets of C{fraction} of a core; the
    order of the paths is flipped every other round.
    """
    results = {path: [] for path in paths}
    for r in range(rounds):
        for path in (paths if r % 2 == 0 else paths[::-1]):
            with cpu_budgets(pids_of(path), fraction):
                results[path].append(measure(path))
    return results
