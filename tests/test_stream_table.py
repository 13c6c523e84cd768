"""Tests for L{anyproxy.gateway.stream_table}, on a C{Clock} with fake streams."""

import json
import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.access_log import AccessLog
from anyproxy.gateway.stream_table import KICKED, StreamTable, target_text


class FakeStream:
    """The parts of a mux stream the table uses."""

    def __init__(self, sent=0, received=0, dialed=None):
        self.bytes_sent = sent
        self.bytes_received = received
        self.dialed = dialed
        self.ended_cleanly = False
        self.resets = []
        self._hooks = []

    def notify_closed(self, hook):
        self._hooks.append(hook)

    def end(self, cleanly=True):
        self.ended_cleanly = cleanly
        for hook in self._hooks:
            hook(self)

    def reset(self, reason):
        self.resets.append(reason)
        self.end(cleanly=False)


class FakeTunnel:
    client_id = "site-a"
    group = "lab"


class FakeEndpoint:
    user = "bob"
    source = "192.0.2.7:40000"
    frontend = "socks5 proxy"
    kind = "tcp"
    host = "db.internal"
    port = 5432
    group = "lab"


class StreamTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "access.jsonl")

    def table(self, access_log=True):
        log = AccessLog(self.path, self.clock) if access_log else None
        table = StreamTable(self.clock, log, node="gw1")
        self.addCleanup(table.close)
        return table

    def lines(self, table):
        table.access_log.flush()
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_listed_until_it_ends(self):
        """An opened stream is listed with its fields, and leaves the table when it ends."""
        table = self.table(access_log=False)
        stream = FakeStream(sent=10, received=20)
        table.opened(stream, FakeTunnel(), FakeEndpoint(), self.clock.seconds())
        self.clock.advance(2.5)
        [row] = table.snapshot()
        stream_id = row.pop("id")
        self.assertRegex(stream_id, r"^[0-9a-f]{4}-1$")
        self.assertEqual(row, {
            "user": "bob", "source": "192.0.2.7:40000", "frontend": "socks5 proxy",
            "kind": "tcp", "target": "db.internal:5432", "group": "lab", "client_id": "site-a",
            "node": "gw1", "opened": 1700000000.0, "age": 2.5, "bytes_up": 10,
            "bytes_down": 20})
        self.assertEqual(table.count_by_user(), {"bob": 1})
        stream.end()
        self.assertEqual((table.snapshot(), table.streams), ([], {}))

    def test_ids_unique(self):
        """Each stream gets its own id."""
        table = self.table(access_log=False)
        for _ in range(3):
            table.opened(FakeStream(), FakeTunnel(), FakeEndpoint(), 0.0)
        self.assertEqual(len(set(table.streams)), 3)

    def test_end_written_to_access_log(self):
        """A stream's end writes its line with closed or reset."""
        table = self.table()
        clean, broken = FakeStream(5, 6), FakeStream()
        for stream in (clean, broken):
            table.opened(stream, FakeTunnel(), FakeEndpoint(), self.clock.seconds())
        self.clock.advance(1)
        clean.end()
        broken.end(cleanly=False)
        first, second = self.lines(table)
        self.assertEqual((first["outcome"], first["bytes_up"], first["bytes_down"],
                          first["duration"], first["node"]), ("closed", 5, 6, 1.0, "gw1"))
        self.assertEqual(second["outcome"], "reset")

    def test_kick(self):
        """kick resets the stream and its line says kicked; an unknown id is False."""
        table = self.table()
        stream = FakeStream()
        table.opened(stream, FakeTunnel(), FakeEndpoint(), 0.0)
        [stream_id] = table.streams
        self.assertTrue(table.kick(stream_id))
        self.assertEqual(stream.resets, [Reason.GENERAL_FAILURE])
        self.assertFalse(table.kick(stream_id))
        [line] = self.lines(table)
        self.assertEqual(line["outcome"], KICKED)

    def test_refusal_logged(self):
        """A refused open is one line with the reason; the failure goes on."""
        table = self.table()
        opening = defer.Deferred()
        watched = table.watch_refusals(opening, FakeEndpoint())
        self.clock.advance(0.5)
        opening.errback(StreamOpenError(Reason.NO_TUNNEL))
        self.failureResultOf(watched, StreamOpenError)
        [line] = self.lines(table)
        self.assertEqual((line["outcome"], line["duration"], line["client_id"], line["target"]),
                         ("no_tunnel", 0.5, "", "db.internal:5432"))

    def test_no_access_log_adds_nothing(self):
        """Without an access log, watch_refusals leaves the Deferred as it was."""
        table = self.table(access_log=False)
        opening = defer.Deferred()
        self.assertIs(table.watch_refusals(opening, FakeEndpoint()), opening)
        self.assertEqual(opening.callbacks, [])

    def test_target_text(self):
        """IPv6 literals are bracketed."""
        self.assertEqual(target_text("2001:db8::1", 443), "[2001:db8::1]:443")
        self.assertEqual(target_text("example.com", 80), "example.com:80")

    def test_kick_unknown_ids(self):
        """Ids of another run, malformed ones and finished ones close nothing."""
        table = self.table(access_log=False)
        stream = FakeStream()
        table.opened(stream, FakeTunnel(), FakeEndpoint(), 0.0)
        [stream_id] = table.streams
        tag = stream_id.split("-")[0]
        other = "%04x" % ((int(tag, 16) + 1) % 0x10000,)
        for wrong in (other + "-1", tag + "-\u0661", tag + "-01x", tag + "-01", tag, "", tag + "-2"):
            self.assertFalse(table.kick(wrong), wrong)
        self.assertEqual(stream.resets, [])


class BrokenAccessLogTests(SynchronousTestCase):
    """An access log that raises on write does not keep a stream in the table."""

    def test_stream_leaves_table(self):
        class Broken:
            def write(self, record):
                raise ValueError("I/O operation on closed file")
        table = StreamTable(task.Clock(), Broken(), node="gw1")
        stream = FakeStream()
        table.opened(stream, FakeTunnel(), FakeEndpoint(), 0.0)
        later = []
        stream.notify_closed(lambda _: later.append("slot released"))
        stream.end()
        self.assertEqual(table.snapshot(), [])
        self.assertEqual(later, ["slot released"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
