"""
End to end through real twistd processes: the C{log} keys of the Go
AnyProxy's config files (C{output}, C{max_size}, C{max_backups}, C{max_age},
C{compress}) as an operator runs them, and a missing log directory stopping
both programs with one line.
"""

import gzip
import os
import sys
import time

import yaml
from twisted.internet import defer, reactor

from tests.test_e2e_twistd import ROOT, TWISTD, ProcessWatcher, TwistdBase, wait_until

MB = 1024 * 1024
STARTED = "Starting factory"  # the client's first line: it dials the (absent) gateway


class SplitWatcher(ProcessWatcher):
    """Keeps stdout and stderr apart."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def errReceived(self, data):
        self.errors.append(data)

    def stdout(self):
        return self.text()

    def stderr(self):
        return b"".join(self.errors).decode("utf-8", "replace")


def spawn(testcase, *args):
    """C{twistd -n --pidfile= ARGS} with stdout and stderr apart; killed at cleanup."""
    watcher = SplitWatcher()
    env = {"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}
    watcher.transport = reactor.spawnProcess(
        watcher, sys.executable, (sys.executable,) + TWISTD + ("-n", "--pidfile=") + args,
        env=env, path=ROOT)

    def stop():
        if not watcher.ended.called:
            watcher.transport.signalProcess("KILL")
        return watcher.ended

    testcase.addCleanup(stop)
    return watcher


def write(path, text, days_old=0):
    with open(path, "wb") as f:
        f.write(gzip.compress(text.encode()) if path.endswith(".gz") else text.encode())
    if days_old:
        when = time.time() - days_old * 86400
        os.utime(path, (when, when))


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode()


class LogKeysTests(TwistdBase):
    """The log section of a Go AnyProxy config file, honoured by the twistd programs."""

    def set_log(self, log):
        with open(self.config) as f:
            data = yaml.safe_load(f)
        data["log"] = log
        with open(self.config, "w") as f:
            yaml.safe_dump(data, f)
        self.logs = os.path.join(os.path.dirname(self.config), "logs")
        os.makedirs(self.logs, exist_ok=True)
        return os.path.join(self.logs, "anyproxy.log")

    def listing(self):
        return sorted(os.listdir(self.logs))

    def start(self, program="anyproxy-client"):
        return spawn(self, program, "--config=" + self.config)

    @defer.inlineCallbacks
    def test_output_stdout_ignores_file(self):
        """output: stdout writes stdout, even with a file named (the Go rule)."""
        path = self.set_log({"file": "logs/anyproxy.log", "output": "stdout"})
        watcher = self.start()
        yield wait_until(lambda: STARTED in watcher.stdout())
        self.assertNotIn(STARTED, watcher.stderr())
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_output_stderr(self):
        """output: stderr writes stderr, and nothing goes to stdout."""
        path = self.set_log({"file": "logs/anyproxy.log", "output": "stderr"})
        watcher = self.start()
        yield wait_until(lambda: STARTED in watcher.stderr())
        self.assertNotIn(STARTED, watcher.stdout())
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_output_file(self):
        """output: file writes log.file (as does a file with no output, as before)."""
        for log in ({"file": "logs/anyproxy.log", "output": "file"},
                    {"file": "logs/anyproxy.log"}):
            path = self.set_log(log)
            watcher = self.start()
            yield wait_until(lambda: os.path.exists(path) and STARTED in read(path))
            self.assertNotIn(STARTED, watcher.stdout() + watcher.stderr())
            watcher.transport.signalProcess("KILL")
            yield watcher.ended
            os.remove(path)

    @defer.inlineCallbacks
    def test_rotated_by_size_compressed_max_backups(self):
        """
        A file past max_size (MB) is rotated at the next line; the rotated
        files are gzipped, and max_backups of them stay, counted gzipped or
        not: those beyond are deleted.
        """
        path = self.set_log({"file": "logs/anyproxy.log", "max_size": 1, "max_backups": 3,
                             "compress": True})
        earlier = "an earlier run's line\n" * (MB // 22 + 1)  # just over 1 MB
        write(path, earlier)
        for name in ("anyproxy.log.1", "anyproxy.log.2.gz", "anyproxy.log.3.gz",
                     "anyproxy.log.4"):
            write(os.path.join(self.logs, name), "backup " + name.split(".")[2] + "\n")
        self.start()
        expected = ["anyproxy.log", "anyproxy.log.1.gz", "anyproxy.log.2.gz",
                    "anyproxy.log.3.gz"]
        yield wait_until(lambda: self.listing() == expected)
        self.assertEqual(read(path + ".1.gz"), earlier)
        self.assertEqual(read(path + ".2.gz"), "backup 1\n")  # shifted, then gzipped
        self.assertEqual(read(path + ".3.gz"), "backup 2\n")  # shifted; 3 and 4 deleted
        yield wait_until(lambda: STARTED in read(path))
        self.assertLess(os.path.getsize(path), MB)

    @defer.inlineCallbacks
    def test_max_age_removes_old_files(self):
        """
        Rotated files last written more than max_age days ago are deleted;
        without compress the rotated file stays plain text.
        """
        path = self.set_log({"file": "logs/anyproxy.log", "max_size": 1, "max_age": 2})
        earlier = "x" * (MB + 1)
        write(path, earlier)
        write(path + ".1", "recent\n", days_old=1)
        write(path + ".2", "old\n", days_old=3)
        write(path + ".3.gz", "old, gzipped\n", days_old=30)
        self.start()
        yield wait_until(lambda: self.listing() == ["anyproxy.log", "anyproxy.log.1",
                                                    "anyproxy.log.2"])
        self.assertEqual(read(path + ".1"), earlier)
        self.assertEqual(read(path + ".2"), "recent\n")
        yield wait_until(lambda: STARTED in read(path))

    @defer.inlineCallbacks
    def test_missing_directory_one_line(self):
        """
        A log.file in a missing directory stops both programs at start with
        one line naming the file and the key, exit code 1, no traceback.
        """
        self.set_log({"file": "no-such-dir/anyproxy.log"})
        missing = os.path.join(os.path.dirname(self.config), "no-such-dir")
        for program in ("anyproxy-gateway", "anyproxy-client"):
            watcher = self.start(program)
            reason = yield watcher.ended
            output = watcher.stdout() + watcher.stderr()
            self.assertEqual(getattr(reason, "exitCode", 0), 1, output)
            self.assertNotIn("Traceback", output)
            lines = [line for line in output.splitlines() if "log.file" in line]
            self.assertEqual(len(lines), 1, output)
            self.assertIn("%s: log.file: directory not found: %s (" % (self.config, missing),
                          lines[0])
            self.assertFalse(os.path.exists(missing))
