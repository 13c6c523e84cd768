# -*- test-case-name: tests.test_access_log -*-
"""
The access log (C{gateway.access_log}): one JSON line per user stream, in a
file of its own, apart from the diagnostic log, so that it can be shipped
and kept on its own terms.

Each line is one L{StreamRecord}: when the stream opened and closed (UTC,
ISO 8601 with milliseconds), who asked (user, source address, frontend),
who served it (group, client id, gateway node), the target as asked and
the address the client dialed, bytes each way, the duration, and the
outcome: C{"closed"} (both ends finished), C{"reset"}, or the L{Reason}
name of a refusal (C{"not_allowed"}, C{"connection_refused"}, ...).  No
password or token is ever part of a record: nothing in it comes from a
credential but the user's name.

The file is rotated by size like the diagnostic log file (the C{log}
section's C{max_size}, C{max_backups}, C{max_age}, C{compress}), with
L{anyproxy.logs.RotatingLogFile}.  Lines are buffered and flushed once a
second and on close, so a busy gateway does not pay a system call per
stream.
"""

import datetime
import json
import os

import attr
from twisted.internet import task
from twisted.logger import Logger

from anyproxy.logs import RotatingLogFile

log = Logger()

FLUSH_INTERVAL = 1.0


def _iso(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


@attr.s(slots=True)
class StreamRecord:
    """
    One user stream, as its access-log line holds it.

    @ivar opened: when the user's request arrived (seconds since the epoch).
    @ivar closed: when the stream ended or was refused.
    @ivar dialed: C{host:port} the client connected to (empty when no dial
        happened or the client did not say).
    @ivar outcome: C{"closed"}, C{"reset"} or a refusal's reason name.
    """

    opened = attr.ib()
    user = attr.ib(default="")
    source = attr.ib(default="")
    frontend = attr.ib(default="")
    kind = attr.ib(default="tcp")
    target = attr.ib(default="")
    group = attr.ib(default="")
    client_id = attr.ib(default="")
    node = attr.ib(default="")
    dialed = attr.ib(default="")
    closed = attr.ib(default=None)
    bytes_up = attr.ib(default=0)  # user -> target
    bytes_down = attr.ib(default=0)  # target -> user
    outcome = attr.ib(default="")
    relayed_via = attr.ib(default="")  # the fleet node that held the tunnel, when relayed

    def as_json(self):
        closed = self.closed if self.closed is not None else self.opened
        line = {
            "opened": _iso(self.opened), "closed": _iso(closed),
            "duration": round(max(0.0, closed - self.opened), 3),
            "user": self.user, "source": self.source, "frontend": self.frontend,
            "kind": self.kind, "target": self.target, "group": self.group,
            "client_id": self.client_id, "node": self.node, "dialed": self.dialed,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "outcome": self.outcome,
        }
        if self.relayed_via:
            line["relayed_via"] = self.relayed_via
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class AccessLog:
    """
    Writes L{StreamRecord}s to a rotated file.

    @param path: the file's path.
    @param clock: an C{IReactorTime} (flushes).
    @param max_size: bytes before the file is rotated.
    @param max_backups: rotated files kept (0: all).
    @param max_age: seconds a rotated file is kept (0: any age).
    @param compress: gzip rotated files.
    @ivar written: lines written (metrics, tests).
    """

    def __init__(self, path, clock, max_size=100 * 1024 * 1024, max_backups=10, max_age=0,
                 compress=False, node=""):
        directory, name = os.path.split(os.path.abspath(path))
        self.path = path
        self.node = node
        self._file = RotatingLogFile(name, directory, rotateLength=max_size,
                                     maxRotatedFiles=max_backups or None, maxAge=max_age,
                                     compress=compress, defaultMode=0o640)
        self._pending = False
        self._flusher = task.LoopingCall(self.flush)
        self._flusher.clock = clock
        self._flusher.start(FLUSH_INTERVAL, now=False)
        self.written = 0

    @classmethod
    def from_config(cls, config, clock, node=""):
        """The access log C{config.gateway.access_log} names, or C{None} when it is off."""
        path = getattr(config.gateway, "access_log", "") if config.gateway is not None else ""
        if not path:
            return None
        settings = config.log
        return cls(path, clock, max_size=settings.max_size * 1024 * 1024,
                   max_backups=settings.max_backups, max_age=settings.max_age * 86400,
                   compress=settings.compress, node=node)

    def write(self, record):
        """Append C{record} (a L{StreamRecord}) as one line."""
        if not record.node:
            record.node = self.node
        try:
            self._file.write(record.as_json() + "\n")
        except OSError as e:
            log.error("access log {path}: {error}", path=self.path, error=e)
            return
        self.written += 1
        self._pending = True

    def flush(self):
        if self._pending:
            self._pending = False
            try:
                self._file.flush()
            except OSError as e:
                log.error("access log {path}: {error}", path=self.path, error=e)

    def close(self):
        """Flush and close the file."""
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        self._file.close()
