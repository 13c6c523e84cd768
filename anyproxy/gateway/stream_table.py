# -*- test-case-name: tests.test_management_api,tests.test_access_log -*-
"""
The gateway's table of open user streams (L{StreamTable}): what
C{GET /api/streams} lists and C{DELETE /api/streams/{id}} closes, and where
each stream's access-log line (L{anyproxy.gateway.access_log}) comes from.

Theory of operation
-------------------
Every stream a frontend opens through a
L{anyproxy.tunnel.endpoint.TunnelEndpoint} is put in the table when its
client accepts it (L{StreamTable.opened}) and taken out when it ends.  The
entry (L{OpenStream}) only holds references: the stream, its tunnel, the
endpoint (user, source address, frontend, target) and the time.  Nothing is
formatted while the stream runs: its L{StreamRecord} is built when the API
asks for the list, or once, at the end, when an access log is on.  So with
nobody listening a stream costs one dict insert and one remove.

Refused opens (no tunnel, a limit, the client's ACL answer, a timeout, the
user leaving first) never enter the table; with an access log on,
L{StreamTable.watch_refusals} writes their line, with the reason as the
outcome.  Without one it adds nothing to the open.

Ids are short and unique for the gateway process: a random tag drawn at
start and a counter (C{"k3f9-1a"}), so an id copied from an earlier run of
the gateway does not close a stream of this one.

The address the client dialed (C{dialed}) comes in the stream's OPEN_OK
from a client that sends it (docs/PROTOCOL.md); it is empty for a refused
stream, a UDP association, or an older client.
"""

import binascii
import functools
import itertools
import os
import re
import socket

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.access_log import AccessLog, StreamRecord

log = Logger()

_HEX = re.compile("[1-9a-f][0-9a-f]{0,15}")  # as "%x" writes a number from 1

# The outcome of a stream an operator closed (DELETE /api/streams/{id}).
KICKED = "kicked"


def target_text(host, port):
    """C{host:port}, with an IPv6 literal in brackets."""
    if ":" in str(host):
        return "[%s]:%s" % (host, port)
    return "%s:%s" % (host, port)


def refusal_outcome(failure):
    """The outcome of a refused open: the reason's name, or C{"cancelled"}."""
    if failure.check(defer.CancelledError):
        return "cancelled"
    if failure.check(StreamOpenError):
        return failure.value.reason.name.lower()
    return Reason.GENERAL_FAILURE.name.lower()


@attr.s(slots=True, eq=False)
class OpenStream:
    """
    One open user stream in the table.

    @ivar id: its id in the API.
    @ivar stream: the L{anyproxy.tunnel.mux.Stream}.
    @ivar tunnel: the tunnel it runs through (C{client_id}, C{group}).
    @ivar endpoint: the L{anyproxy.tunnel.endpoint.TunnelEndpoint} that
        opened it (user, source, frontend, target).
    @ivar opened: when the gateway began opening it (seconds since the epoch).
    @ivar kicked: whether an operator closed it.
    """

    id = attr.ib()
    stream = attr.ib()
    tunnel = attr.ib()
    endpoint = attr.ib()
    opened = attr.ib()
    kicked = attr.ib(default=False)

    def record(self, node="", closed=None, outcome=""):
        """This stream as a L{StreamRecord}."""
        endpoint, stream = self.endpoint, self.stream
        return StreamRecord(
            opened=self.opened, closed=closed, user=endpoint.user, source=endpoint.source,
            frontend=endpoint.frontend or "", kind=endpoint.kind,
            target=target_text(endpoint.host, endpoint.port),
            group=getattr(self.tunnel, "group", endpoint.group),
            client_id=getattr(self.tunnel, "client_id", ""), node=node,
            dialed=target_text(*stream.dialed) if stream.dialed else "",
            bytes_up=stream.bytes_sent, bytes_down=stream.bytes_received, outcome=outcome)

    def as_json(self, now, node=""):
        """What C{GET /api/streams} says of it."""
        record = self.record(node)
        return {
            "id": self.id, "user": record.user, "source": record.source,
            "frontend": record.frontend, "kind": record.kind, "target": record.target,
            "group": record.group, "client_id": record.client_id, "node": record.node,
            "opened": self.opened, "age": max(0.0, now - self.opened),
            "bytes_up": record.bytes_up, "bytes_down": record.bytes_down,
        }


class StreamTable:
    """
    The open user streams, by id; see the module docstring.

    @param clock: an C{IReactorTime} (the reactor: its C{seconds} is the
        time since the epoch).
    @param access_log: an L{AccessLog} or C{None}.
    @param node: this gateway's name in records (a fleet node id or the host name).
    """

    def __init__(self, clock, access_log=None, node=""):
        self._clock = clock
        self.access_log = access_log
        self.node = node
        self._open = {}  # number -> (stream, tunnel, endpoint, started)
        self._kicked = set()  # numbers of streams an operator closed
        self._tag = binascii.hexlify(os.urandom(2)).decode("ascii")
        self._numbers = itertools.count(1)

    @classmethod
    def from_config(cls, config, clock, node=None):
        """The table for a loaded config, with its access log when C{gateway.access_log} is set."""
        if node is None:
            node = socket.gethostname()
        table = cls(clock, AccessLog.from_config(config, clock, node=node), node)
        table._log_settings = config.log
        return table

    # -- what TunnelEndpoint calls ---------------------------------------------

    def opened(self, stream, tunnel, endpoint, started):
        """A stream was accepted by C{tunnel}'s client: list it until it ends."""
        # The per-stream path: a tuple and a number; ids and records are
        # made only when asked for.
        number = next(self._numbers)
        self._open[number] = (stream, tunnel, endpoint, started)
        stream.notify_closed(functools.partial(self._ended, number))

    @property
    def streams(self):
        """C{{id: OpenStream}}: the open streams, a new dict."""
        return {entry.id: entry for entry in map(self._entry, self._open)}

    def _entry(self, number):
        stream, tunnel, endpoint, started = self._open[number]
        return OpenStream("%s-%x" % (self._tag, number), stream, tunnel, endpoint, started,
                          kicked=number in self._kicked)

    def _number(self, stream_id):
        tag, _, number = stream_id.partition("-")
        if tag != self._tag or _HEX.fullmatch(number) is None:
            return None
        number = int(number, 16)
        return number if number in self._open else None

    def watch_refusals(self, opening, endpoint):
        """
        Log a refusal of the open C{opening} (a Deferred) when an access log
        is on; otherwise add nothing.

        @return: C{opening}.
        """
        if self.access_log is None:
            return opening
        started = self._clock.seconds()

        def refused(failure):
            access_log = self.access_log
            if access_log is not None:
                access_log.write(StreamRecord(
                    opened=started, closed=self._clock.seconds(), user=endpoint.user,
                    source=endpoint.source, frontend=endpoint.frontend or "",
                    kind=endpoint.kind, target=target_text(endpoint.host, endpoint.port),
                    group=endpoint.group, node=self.node, outcome=refusal_outcome(failure)))
            return failure

        return opening.addErrback(refused)

    def record_refusal(self, user, source, frontend, kind, host, port, group, error):
        """
        Log a stream the gateway refused before opening it (a user's own
        policy: L{anyproxy.gateway.app.UserEndpoints}), when an access log
        is on.  C{error} is the L{anyproxy.errors.StreamOpenError} answered.
        """
        access_log = self.access_log
        if access_log is None:
            return
        now = self._clock.seconds()
        access_log.write(StreamRecord(
            opened=now, closed=now, user=user, source=source, frontend=frontend or "",
            kind=kind, target=target_text(host, port), group=group, node=self.node,
            outcome=refusal_outcome(Failure(error))))

    def _ended(self, number, stream):
        try:
            access_log = self.access_log
            if access_log is not None:
                entry = self._entry(number)
                if entry.kicked:
                    outcome = KICKED
                else:
                    outcome = "closed" if stream.ended_cleanly else "reset"
                access_log.write(entry.record(self.node, self._clock.seconds(), outcome))
        except Exception:
            # Logged, not raised: the close hooks after this one (the
            # user's slot, its connection) must still run.
            log.failure("access log: the end of stream {number} was not written", number=number)
        finally:
            del self._open[number]
            self._kicked.discard(number)

    # -- what the management API calls -----------------------------------------

    def snapshot(self):
        """The open streams as JSON-able dicts, oldest first."""
        now = self._clock.seconds()
        entries = sorted(map(self._entry, self._open), key=lambda entry: entry.opened)
        return [entry.as_json(now, self.node) for entry in entries]

    def kick(self, stream_id):
        """
        Close stream C{stream_id}: RESET to the client, the user's
        connection closed.

        @return: whether there was such a stream.
        """
        number = self._number(stream_id)
        if number is None:
            return False
        self._kicked.add(number)
        self._open[number][0].reset(Reason.GENERAL_FAILURE)
        return True

    def count_by_user(self):
        """C{{user name: open streams}}."""
        counts = {}
        for _, _, endpoint, _ in self._open.values():
            counts[endpoint.user] = counts.get(endpoint.user, 0) + 1
        return counts

    # -- reload and stop -------------------------------------------------------

    def prepare(self, config):
        """
        See L{anyproxy.interfaces.IReconfigurable}: C{gateway.access_log}
        (and the C{log} rotation settings) take effect for streams ending
        from now on; the old file is flushed and closed.
        """
        old = self.access_log
        path = getattr(config.gateway, "access_log", "")
        unchanged = old is not None and old.path == path and config.log == self._log_settings
        log_settings = config.log

        def apply():
            self._log_settings = log_settings
            if unchanged:
                return defer.succeed([])
            notes = []
            try:
                self.access_log = AccessLog.from_config(config, self._clock, node=self.node)
            except OSError as e:
                self.access_log = None
                notes.append("gateway.access_log: cannot open %s (%s): the access log is off"
                             % (path, e.strerror))
            if old is not None:
                old.close()
            return defer.succeed(notes)

        return apply

    _log_settings = None

    def close(self):
        """Flush and close the access log (the gateway stopped)."""
        access_log, self.access_log = self.access_log, None
        if access_log is not None:
            access_log.close()
