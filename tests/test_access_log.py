"""
Tests for L{anyproxy.gateway.access_log}: the file itself, then a gateway
writing it for real SOCKS5 and HTTP users (L{anyproxy.gateway.stream_table}).
"""

import json
import os
import socket

import socks
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.gateway.access_log import AccessLog, StreamRecord
from tests.support import PROXY_PASSWORD, PROXY_USER, Deployment, Echo, listen_tcp, run_curl
from tests.test_e2e_tcp import socks_echo


class AccessLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "access.jsonl")

    def lines(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_one_line_per_record_flushed_each_second(self):
        access = AccessLog(self.path, self.clock, node="gw1")
        self.addCleanup(access.close)
        access.write(StreamRecord(
            opened=1700000000.25, closed=1700000001.5, user="bob", source="127.0.0.1:5555",
            frontend="socks5", target="db.internal:5432", group="lab", client_id="site-a",
            dialed="10.0.0.7:5432", bytes_up=10, bytes_down=20, outcome="closed"))
        self.clock.advance(1)
        [line] = self.lines()
        self.assertEqual(line, {
            "opened": "2023-11-14T22:13:20.250Z", "closed": "2023-11-14T22:13:21.500Z",
            "duration": 1.25, "user": "bob", "source": "127.0.0.1:5555", "frontend": "socks5",
            "kind": "tcp", "target": "db.internal:5432", "group": "lab", "client_id": "site-a",
            "node": "gw1", "dialed": "10.0.0.7:5432", "bytes_up": 10, "bytes_down": 20,
            "outcome": "closed"})

    def test_refusal_without_close_time(self):
        access = AccessLog(self.path, self.clock)
        access.write(StreamRecord(opened=1700000000.0, user="eve", outcome="not_allowed"))
        access.close()
        [line] = self.lines()
        self.assertEqual((line["duration"], line["outcome"], line["closed"]),
                         (0.0, "not_allowed", line["opened"]))

    def test_rotation_by_size(self):
        access = AccessLog(self.path, self.clock, max_size=2000, max_backups=2)
        for i in range(100):
            access.write(StreamRecord(opened=1700000000.0 + i, user="u%d" % (i,)))
        access.close()
        names = sorted(os.listdir(self.directory))
        self.assertEqual(names, ["access.jsonl", "access.jsonl.1", "access.jsonl.2"])
        self.assertEqual(self.lines()[-1]["user"], "u99")

    def test_rotation_that_cannot_reopen(self):
        """
        A rotation that cannot open the new file (no descriptor left, once)
        loses that line and says so; the next write opens the file, and no
        write raises.
        """
        import errno
        from twisted.python import logfile
        access = AccessLog(self.path, self.clock, max_size=300, max_backups=3)
        for i in range(2):
            access.write(StreamRecord(opened=1.0, user="u%d" % (i,), target="t:1"))

        def no_descriptor(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")
        # The module calls the builtin open: shadowed for one write.
        logfile.open = no_descriptor
        try:
            access.write(StreamRecord(opened=1.0, user="lost", target="t:1"))  # cannot reopen
        finally:
            del logfile.open
        for i in range(3, 6):
            access.write(StreamRecord(opened=1.0, user="u%d" % (i,), target="t:1"))
        access.close()
        self.assertEqual([line["user"] for line in self.lines()][-1], "u5")

    def test_rotated_file_private_while_compressed(self):
        """A rotated file being gzipped is created readable by its owner only."""
        from anyproxy import logs
        source = os.path.join(self.directory, "rotated.1")
        with open(source, "w") as f:
            f.write("secret\n")
        os.chmod(source, 0o640)
        modes = []
        real_copy = logs.shutil.copyfileobj

        def watch(*args, **kwargs):
            modes.append(os.stat(source + ".gz.tmp").st_mode & 0o777)
            return real_copy(*args, **kwargs)
        self.patch(logs.shutil, "copyfileobj", watch)
        logs._gzip_files([source])
        self.assertEqual(modes, [0o600])
        self.assertEqual(os.stat(source + ".gz").st_mode & 0o777, 0o640)


# -- end to end: a gateway writing its access log -------------------------------


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


class OneAnswer(protocol.Protocol):
    """An origin that answers one HTTP request with L{ANSWER}, then closes."""

    def dataReceived(self, data):
        self.transport.write(ANSWER)
        self.transport.loseConnection()


class AccessLogEndToEndTests(unittest.TestCase):
    """A gateway's access log, line by line, for real SOCKS5 and HTTP users."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.path = os.path.join(self.deployment.directory, "access.jsonl")
        yield self.deployment.start_gateway(gateway={"access_log": self.path})
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.forbidden_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield self.deployment.start_client(client={
            "forbidden_hosts": ["127.0.0.1:%d" % (self.forbidden_port,)]})
        self.table = self.deployment.gateway.user_endpoints.stream_table

    @defer.inlineCallbacks
    def wait_for_lines(self, count):
        for _ in range(200):
            if self.table.access_log.written >= count:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.table.access_log.flush()
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def check_times(self, line, started, ended):
        for key in ("opened", "closed"):
            self.assertRegex(line[key], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertGreaterEqual(line["duration"], 0.0)
        self.assertLessEqual(line["duration"], ended - started + 0.01)

    @defer.inlineCallbacks
    def test_socks5_stream(self):
        """A SOCKS5 CONNECT: every field of its line."""
        started = reactor.seconds()
        echoed = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                     self.echo_port, b"z" * 3000)
        self.assertEqual(len(echoed), 3000)
        [line] = yield self.wait_for_lines(1)
        self.check_times(line, started, reactor.seconds())
        source = line.pop("source")
        self.assertRegex(source, r"^127\.0\.0\.1:\d+$")
        for key in ("opened", "closed", "duration"):
            del line[key]
        self.assertEqual(line, {
            "user": PROXY_USER, "frontend": "socks5 proxy", "kind": "tcp",
            "target": "127.0.0.1:%d" % (self.echo_port,), "group": "default",
            "client_id": "client-1", "node": socket.gethostname(),
            "dialed": "127.0.0.1:%d" % (self.echo_port,),
            "bytes_up": 3000, "bytes_down": 3000, "outcome": "closed"})

    @defer.inlineCallbacks
    def test_http_request(self):
        """An absolute-URI request through the HTTP proxy: every field of its line."""
        origin = listen_tcp(self, protocol.Factory.forProtocol(OneAnswer)).getHost().port
        started = reactor.seconds()
        out, err, code = yield run_curl(
            "-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                 self.deployment.http_port),
            "http://127.0.0.1:%d/page" % (origin,))
        self.assertEqual((code, out), (0, b"hello"), err)
        [line] = yield self.wait_for_lines(1)
        self.check_times(line, started, reactor.seconds())
        self.assertRegex(line.pop("source"), r"^127\.0\.0\.1:\d+$")
        self.assertGreater(line.pop("bytes_up"), 40)  # the rewritten request head
        for key in ("opened", "closed", "duration"):
            del line[key]
        self.assertEqual(line, {
            "user": PROXY_USER, "frontend": "http proxy", "kind": "tcp",
            "target": "127.0.0.1:%d" % (origin,), "group": "default",
            "client_id": "client-1", "node": socket.gethostname(),
            "dialed": "127.0.0.1:%d" % (origin,),
            "bytes_down": len(ANSWER), "outcome": "closed"})

    @defer.inlineCallbacks
    def test_refused_stream(self):
        """A target the client forbids: REP 0x02 for the user, a not_allowed line."""
        started = reactor.seconds()
        with self.assertRaises(socks.GeneralProxyError) as raised:
            yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                self.forbidden_port, b"x")
        self.assertIn("not allowed", str(raised.exception))
        [line] = yield self.wait_for_lines(1)
        self.check_times(line, started, reactor.seconds())
        self.assertRegex(line.pop("source"), r"^127\.0\.0\.1:\d+$")
        for key in ("opened", "closed", "duration"):
            del line[key]
        self.assertEqual(line, {
            "user": PROXY_USER, "frontend": "socks5 proxy", "kind": "tcp",
            "target": "127.0.0.1:%d" % (self.forbidden_port,), "group": "default",
            "client_id": "", "node": socket.gethostname(), "dialed": "",
            "bytes_up": 0, "bytes_down": 0, "outcome": "not_allowed"})
        self.assertEqual(self.table.streams, {})
