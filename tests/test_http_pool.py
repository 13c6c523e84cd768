"""
The HTTP proxy's upstream pool: idle connections reused by the same user's
next request to the same origin (anyproxy.frontends.http.pool and
ForwardExchange).  End to end through a gateway and client: test_e2e_http_pool.
"""

import h11
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from anyproxy.auth import UserDatabase
from anyproxy.frontends.http.pool import UpstreamPool
from anyproxy.interfaces import IAdmittingEndpoint
from anyproxy.limits import Release
from tests.test_http_proxy import PASSWORD, _basic, _FakeStream, _User

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Entry:
    def __init__(self, name):
        self.name = name
        self.closed = False

    def close(self):
        self.closed = True

    def __repr__(self):
        return self.name


class UpstreamPoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock, max_idle=3, idle_timeout=10)

    def test_take_newest_first(self):
        """take() returns the most recently idle entry of the key, and only of that key."""
        a, b, c = _Entry("a"), _Entry("b"), _Entry("c")
        self.pool.put("k", a)
        self.pool.put("k", b)
        self.pool.put("other", c)
        self.assertEqual([self.pool.take("k"), self.pool.take("k"), self.pool.take("k")],
                         [b, a, None])
        self.assertEqual((len(self.pool), self.pool.take("other")), (1, c))
        self.assertEqual(len(self.pool), 0)

    def test_full_pool_closes_the_oldest(self):
        """Past max_idle, the entry idle longest is closed and forgotten."""
        entries = [_Entry(str(i)) for i in range(4)]
        for i, entry in enumerate(entries):
            self.pool.put("k%d" % (i % 2), entry)
        self.assertEqual([e.closed for e in entries], [True, False, False, False])
        self.assertEqual((len(self.pool), self.pool.take("k0"), self.pool.take("k0")),
                         (3, entries[2], None))

    def test_idle_timeout(self):
        """An entry unused for idle_timeout is closed; taking it in time cancels that."""
        a, b = _Entry("a"), _Entry("b")
        self.pool.put("k", a)
        self.clock.advance(5)
        self.pool.put("k", b)
        self.clock.advance(5)
        self.assertEqual((a.closed, b.closed, len(self.pool)), (True, False, 1))
        self.assertIs(self.pool.take("k"), b)
        self.clock.advance(100)
        self.assertFalse(b.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discard_and_clear(self):
        """discard() forgets without closing; clear() closes everything."""
        a, b = _Entry("a"), _Entry("b")
        self.pool.put("k", a)
        self.pool.put("k", b)
        self.pool.discard(a)
        self.pool.discard(a)  # twice is harmless
        self.assertFalse(a.closed)
        self.pool.clear()
        self.assertEqual((b.closed, len(self.pool), self.clock.getDelayedCalls()), (True, 0, []))

    def test_cleared_for_good(self):
        """After clear(), put() keeps nothing."""
        self.pool.clear()
        self.assertFalse(self.pool.put("k", _Entry("a")))
        self.assertEqual(len(self.pool), 0)

    def test_close_idle_some(self):
        """close_idle(which) closes the idle entries it picks; others and later ones are kept."""
        a, b, c = _Entry("a"), _Entry("b"), _Entry("c")
        self.pool.put("k", a)
        self.pool.put("k", b)
        self.pool.close_idle(lambda entry: entry is a)
        self.assertEqual((a.closed, b.closed, len(self.pool)), (True, False, 1))
        self.assertTrue(self.pool.put("k", c))
        self.assertEqual([self.pool.take("k"), self.pool.take("k")], [c, b])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disabled(self):
        """max_idle 0 keeps nothing."""
        pool = UpstreamPool(self.clock, max_idle=0)
        self.assertFalse(pool.put("k", _Entry("a")))
        self.assertEqual((len(pool), pool.take("k")), (0, None))


@implementer(IAdmittingEndpoint)
class _AdmittingStream(_FakeStream):
    """A fake stream whose endpoint counts limit slots, like TunnelEndpoint."""

    def __init__(self, opened, slots, *args):
        _FakeStream.__init__(self, *args)
        self._opened = opened
        self._slots = slots
        self.admitted_connect = False

    def connect(self, factory, first_data=b""):
        # An endpoint is made for every request; only connecting opens a stream.
        self._opened.append(self)
        self.first_data = first_data
        return _FakeStream.connect(self, factory)

    def admit(self):
        self._slots.append(1)
        return succeed(Release(self._slots.pop))

    def connect_admitted(self, factory, first_data=b""):
        self.admitted_connect = True
        return self.connect(factory, first_data)

    def succeed(self):
        # What went with the OPEN (the request head: early data) comes first.
        self.protocol = self._factory.buildProtocol(None)
        self.transport = StringTransport()
        self.transport.write(self.first_data)
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)


class _PoolUser(_User):
    def __init__(self, testcase, **options):
        self.slots = []
        _User.__init__(self, testcase, **options)

    def _endpoint_for(self, user, host, port, source=""):
        return _AdmittingStream(self.streams, self.slots, user, host, port)


class ReuseTests(SynchronousTestCase):
    """Forwarded requests reuse idle upstream connections."""

    def setUp(self):
        self.user = _PoolUser(self)

    def exchange(self, target=b"http://example.com/", reply=OK, method=b"GET", **kwargs):
        """One request answered with C{reply}; returns the stream it used."""
        before = len(self.user.streams)
        self.user.request(method, target, **kwargs)
        stream = self.user.streams[-1]
        if len(self.user.streams) > before:
            stream.succeed()
        stream.protocol.dataReceived(reply)
        self.assertEqual(self.user.response()[0], 200)
        return stream

    def last_request(self, stream):
        origin = h11.Connection(h11.SERVER)
        origin.receive_data(stream.transport.value())
        return origin.next_event()

    def test_reused_for_the_same_origin(self):
        """The second request to an origin goes over the first one's stream, kept alive."""
        first = self.exchange()
        self.assertFalse(first.transport.disconnecting)
        first.transport.clear()
        self.user.request(b"GET", b"http://example.com/again")
        self.assertEqual(len(self.user.streams), 1)
        request = self.last_request(first)
        self.assertEqual(request.target, b"/again")
        self.assertNotIn(b"connection", dict(request.headers))
        first.protocol.dataReceived(OK)
        self.assertEqual(self.user.response()[2], b"ok")
        self.assertEqual(first.protocol.exchanges, 2)

    def test_expect_without_100_not_kept(self):
        """
        A request that waited for 100-continue, answered finally without a
        100: the origin may not have read the body, whose bytes would begin
        the next exchange, so the connection is closed, not kept; with the
        100 first it is kept.
        """
        expect = [(b"Host", b"example.com"), (b"Content-Length", b"5"),
                  (b"Expect", b"100-continue")]
        for first, kept in ((b"", False), (b"HTTP/1.1 100 Continue\r\n\r\n", True)):
            user = _PoolUser(self)
            user.send(h11.Request(method=b"POST", target=b"http://example.com/", headers=expect),
                      h11.Data(data=b"hello"), h11.EndOfMessage())
            stream = user.streams[0]
            stream.succeed()
            stream.protocol.dataReceived(first + b"HTTP/1.1 401 Unauthorized\r\n"
                                                 b"Content-Length: 0\r\n\r\n")
            self.assertEqual(stream.transport.disconnecting, not kept)

    def test_not_shared_across_origins_or_users(self):
        """Another host, port or user gets its own connection."""
        self.exchange(b"http://example.com/")
        self.exchange(b"http://example.com:81/")
        self.exchange(b"http://other.example/")
        self.assertEqual(len(self.user.streams), 3)
        users = UserDatabase([("ann", PASSWORD, "lab"), ("bob", PASSWORD, "lab")])
        user = _PoolUser(self, users=users)
        for name in ("ann", "bob"):
            user.request(b"GET", b"http://example.com/",
                         headers=[(b"Proxy-Authorization", _basic(name, PASSWORD))])
            user.streams[-1].succeed()
            user.streams[-1].protocol.dataReceived(OK)
            user.response()
        self.assertEqual([s.user.name for s in user.streams], ["ann", "bob"])

    def test_shared_across_user_connections(self):
        """A new proxy connection of the same user reuses the pooled stream."""
        first = self.exchange()
        again = self.user.factory.buildProtocol(None)
        transport = StringTransport()
        again.makeConnection(transport)
        again.dataReceived(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(len(self.user.streams), 1)
        first.protocol.dataReceived(OK)
        self.assertIn(b"200 OK", transport.value())

    def test_not_kept_when_closing(self):
        """An origin asking to close, or a close-delimited body, ends the connection."""
        stream = self.exchange(reply=b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                     b"Content-Length: 2\r\n\r\nok")
        self.assertTrue(stream.transport.disconnecting)
        self.user.request(b"GET", b"http://example.com/")
        stream = self.user.streams[-1]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nok")
        stream.lose()
        self.assertEqual(self.user.response()[2], b"ok")
        self.assertEqual(len(self.user.factory.upstream_pool), 0)

    def test_bytes_after_the_response_not_kept(self):
        """
        Bytes past the end of a response (a second response, a body after
        HEAD) close the connection: reused, they would answer the next request.
        """
        first = self.exchange(reply=OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        self.assertTrue(first.transport.disconnecting)
        second = self.exchange(b"http://example.com/b", reply=b"HTTP/1.1 200 OK\r\n"
                                                             b"Content-Length: 4\r\n\r\nreal")
        self.assertIsNot(second, first)
        self.user.request(b"HEAD", b"http://example.com/")
        second.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(self.user.response()[0], 200)
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(len(self.user.factory.upstream_pool), 0)

    def test_connection_authentication_not_kept(self):
        """NTLM or Negotiate on either side pins the connection: it is closed, never shared."""
        stream = self.exchange(headers=[(b"Authorization", b"NTLM TlRMTVNTUAABAAAA")])
        self.assertTrue(stream.transport.disconnecting)
        stream = self.exchange(reply=b"HTTP/1.1 200 OK\r\nWWW-Authenticate: Negotiate\r\n"
                                     b"Content-Length: 2\r\n\r\nok")
        self.assertTrue(stream.transport.disconnecting)
        stream = self.exchange(headers=[(b"Authorization", b"Basic dXNlcjpwdw==")])
        self.assertFalse(stream.transport.disconnecting)  # per-request schemes are fine
        self.assertEqual(len(self.user.factory.upstream_pool), 1)

    def test_closing_connection_not_taken(self):
        """A pooled connection already closing is passed over for a new one."""
        first = self.exchange()
        first.transport.disconnecting = True
        second = self.exchange()
        self.assertIsNot(second, first)
        self.assertEqual(len(self.user.streams), 2)

    def test_unfinished_request_not_kept(self):
        """An origin answering before the request body is complete: closed, not kept."""
        self.user.send(h11.Request(method=b"POST", target=b"http://example.com/", headers=[
            (b"Host", b"example.com"), (b"Content-Length", b"10")]), h11.Data(data=b"abc"))
        stream = self.user.streams[0]
        stream.succeed()
        stream.protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(stream.transport.disconnecting)
        self.assertEqual(len(self.user.factory.upstream_pool), 0)

    def test_idle_connection_misbehaving(self):
        """Bytes or a close on an idle connection take it out of the pool."""
        first = self.exchange()
        first.protocol.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(first.transport.disconnecting)
        second = self.exchange()
        self.assertIsNot(second, first)
        second.lose()
        self.assertEqual(len(self.user.factory.upstream_pool), 0)
        self.assertIsNot(self.exchange(), second)

    def test_idle_timeout_and_stop(self):
        """
        Idle connections close after upstream_idle_timeout, and when the
        listener stops; after that, exchanges still finishing keep nothing.
        """
        user = _PoolUser(self, upstream_idle_timeout=5)
        self.user = user
        stream = self.exchange()
        user.clock.advance(5)
        self.assertTrue(stream.transport.disconnecting)
        stream = self.exchange(b"http://other.example/")
        user.factory.stopFactory()
        self.assertTrue(stream.transport.disconnecting)
        stream = self.exchange(b"http://third.example/")
        self.assertTrue(stream.transport.disconnecting)
        self.assertEqual(len(user.factory.upstream_pool), 0)

    def test_retry_when_origin_closed_idle_connection(self):
        """A GET sent on a pooled connection the origin had closed is retried on a new one."""
        first = self.exchange()
        self.user.request(b"GET", b"http://example.com/again")
        first.lose()
        self.assertEqual(len(self.user.streams), 2)
        retry = self.user.streams[1]
        retry.succeed()
        self.assertEqual(retry.request()[0].target, b"/again")
        retry.protocol.dataReceived(OK)
        self.assertEqual(self.user.response()[0], 200)
        # Only once: the retried connection dying is an answer.
        self.user.request(b"GET", b"http://example.com/third")
        retry.lose()
        self.user.streams[-1].succeed()
        self.user.streams[-1].lose()
        self.assertEqual(self.user.response()[0], 502)

    def test_no_retry_with_body_or_after_an_answer(self):
        """A POST, or a request whose answer had begun, is never sent twice."""
        first = self.exchange()
        self.user.request(b"POST", b"http://example.com/", body=b"data")
        first.lose()
        self.assertEqual((len(self.user.streams), self.user.response()[0]), (1, 502))
        second = self.exchange()
        self.user.request(b"GET", b"http://example.com/")
        second.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        second.lose()
        self.assertEqual(len(self.user.streams), 2)
        self.assertEqual(self.user.response()[0], 502)

    def test_user_leaving_closes_it(self):
        """A user gone mid-exchange closes the pooled connection it was using."""
        first = self.exchange()
        self.user.request(b"GET", b"http://example.com/")
        self.user.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(first.transport.disconnecting)
        self.assertEqual(len(self.user.factory.upstream_pool), 0)

    def test_limit_slots_only_while_in_use(self):
        """A slot is held during an exchange and given back when the connection goes idle."""
        self.user.request(b"GET", b"http://example.com/")
        stream = self.user.streams[0]
        self.assertEqual(self.user.slots, [1])
        stream.succeed()
        self.assertTrue(stream.admitted_connect)
        stream.protocol.dataReceived(OK)
        self.user.response()
        self.user.clock.advance(0)
        self.assertEqual(self.user.slots, [])
        self.user.request(b"GET", b"http://example.com/")
        self.assertEqual(self.user.slots, [1])
        self.user.protocol.connectionLost(Failure(ConnectionDone()))
        self.user.clock.advance(0)
        self.assertEqual(self.user.slots, [])

    def test_endpoint_for_raises(self):
        """An endpoint_for that raises is a 502 for that request, and the connection goes on."""
        def broken(user, host, port, source=""):
            raise RuntimeError("no endpoint")
        self.user.factory.endpoint_for = broken
        self.user.request(b"GET", b"http://example.com/")
        self.assertEqual(self.user.response()[0], 502)
        self.assertFalse(self.user.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)

    def test_disabled(self):
        """upstream_keepalive 0: each request its own stream, with Connection: close."""
        user = _PoolUser(self, upstream_keepalive=0)
        self.user = user
        stream = self.exchange()
        self.assertTrue(stream.transport.disconnecting)
        self.assertEqual(dict(stream.request()[0].headers)[b"connection"], b"close")
