"""The temporary directory, the child processes and their logs; free ports."""

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from harness import LOOPBACK, BenchError


class Processes:
    """Owns the temporary directory and every long-running child process."""

    def __init__(self, keep=False):
        self.work = tempfile.mkdtemp(prefix="anyproxy-benchsuite-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.keep = keep
        self.procs = {}

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def spawn(self, name, argv, env=None, cwd=None):
        logfile = open(os.path.join(self.logs, name + ".log"), "wb")
        # A session of its own: Ctrl-C in the terminal reaches only us, and we
        # stop the whole group (sshd's per-connection children included).
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd or self.work,
                                start_new_session=True)
        logfile.close()
        self.procs[name] = proc
        return proc

    def check_alive(self, *names):
        for name in names or list(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise BenchError("%s exited with status %s:\n%s" % (name, proc.returncode,
                                                                    self.log_tail(name)))

    def log_tail(self, name, lines=25):
        try:
            with open(os.path.join(self.logs, name + ".log"), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def stop(self, name, timeout=5.0):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def _signal(proc, sig):
        # proc.pid leads its own process group (start_new_session above).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def close(self, failed=False):
        # Newest first: the AnyProxy client goes before its gateway and so on.
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
            # Children that left the group (none expected): make sure.
            self._signal(proc, signal.SIGKILL)
        if failed:
            for name in self.procs:
                tail = self.log_tail(name, 15)
                if tail.strip():
                    print("--- last lines of %s's log:\n%s" % (name, tail), file=sys.stderr)
        self.procs.clear()
        if self.keep:
            print("kept %s" % self.work, file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port, host=LOOPBACK, timeout=20.0, processes=None, names=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if processes is not None:
                processes.check_alive(*names)
            time.sleep(0.1)
    raise BenchError("nothing listens on %s:%d after %ds" % (host, port, timeout))


def retry(what, check, timeout=30.0, processes=None, names=()):
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except (OSError, BenchError) as e:
            if processes is not None:
                processes.check_alive(*names)
            if time.time() > deadline:
                raise BenchError("%s: %s" % (what, e))
            time.sleep(0.2)


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE (inherited by every child) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def nofile_limit():
    """The soft RLIMIT_NOFILE now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
