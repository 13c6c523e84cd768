# -*- test-case-name: tests.test_limits -*-
"""
Tests for L{anyproxy.limits} (the counting semaphore with a bounded queue),
its use by L{TunnelEndpoint}, L{Stream.notify_closed} and the connection
records of L{anyproxy.records}, all on a L{Clock}.
"""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.config.load import load_config
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.tunnel.endpoint import TunnelEndpoint
from anyproxy.limits import Limiter, Release, acquire_all
from anyproxy.records import StreamRecord, gateway_records, record_of
from tests.test_endpoint import MuxPair, Recorder, RecordingFactory, tunnel_for


def overloaded(testcase, d):
    """Assert C{d} failed OVERLOADED; return the error."""
    error = testcase.failureResultOf(d, StreamOpenError).value
    testcase.assertIs(error.reason, Reason.OVERLOADED)
    return error


class LimiterTests(SynchronousTestCase):
    """A key's slots are handed out up to the limit, then queued in order, boundedly."""

    def setUp(self):
        self.clock = Clock()

    def limiter(self, limit=2, queue_size=3, queue_timeout=5.0):
        return Limiter(self.clock, limit, queue_size, queue_timeout, what="test limit")

    def test_acquire_below_limit(self):
        """Below the limit a slot is given at once, as a L{Release}."""
        limiter = self.limiter()
        release = self.successResultOf(limiter.acquire("alice"))
        self.assertIsInstance(release, Release)
        self.assertEqual(limiter.active("alice"), 1)

    def test_release_frees_the_slot(self):
        """Calling the release gives the slot back; calling it again changes nothing."""
        limiter = self.limiter(limit=1)
        release = self.successResultOf(limiter.acquire("alice"))
        release()
        self.assertTrue(release.released)
        self.assertEqual(limiter.active("alice"), 0)
        release()
        self.assertEqual(limiter.active("alice"), 0)
        self.successResultOf(limiter.acquire("alice"))

    def test_try_acquire(self):
        """try_acquire takes a free slot at once, and never queues or overtakes a waiter."""
        limiter = self.limiter(limit=1)
        release = limiter.try_acquire("alice")
        self.assertEqual(limiter.active("alice"), 1)
        self.assertIsNone(limiter.try_acquire("alice"))
        waiting = limiter.acquire("alice")
        release()
        self.assertEqual(limiter.waiting("alice"), 0)
        self.successResultOf(waiting)()
        self.assertEqual(limiter.keys(), [])

    def test_waits_at_limit(self):
        """At the limit a request waits, and gets the slot the next release frees."""
        limiter = self.limiter(limit=1)
        first = self.successResultOf(limiter.acquire("alice"))
        d = limiter.acquire("alice")
        self.assertNoResult(d)
        self.assertEqual(limiter.waiting("alice"), 1)
        first()
        second = self.successResultOf(d)
        self.assertEqual((limiter.active("alice"), limiter.waiting("alice")), (1, 0))
        second()
        self.assertEqual(limiter.keys(), [])

    def test_fifo(self):
        """Waiters get freed slots in the order they asked."""
        limiter = self.limiter(limit=1)
        holder = self.successResultOf(limiter.acquire())
        order = []
        waits = [limiter.acquire() for _ in range(3)]
        for index, d in enumerate(waits):
            d.addCallback(lambda release, index=index: order.append((index, release)))
        for expected in range(3):
            holder()
            self.assertEqual(order[-1][0], expected)
            holder = order[-1][1]
        self.assertEqual([index for index, _ in order], [0, 1, 2])

    def test_newcomer_does_not_overtake(self):
        """A slot freed while others wait goes to the queue, not to a new request."""
        limiter = self.limiter(limit=1)
        holder = self.successResultOf(limiter.acquire())
        waiting = limiter.acquire()
        holder()
        late = limiter.acquire()
        self.successResultOf(waiting)
        self.assertNoResult(late)

    def test_queue_full(self):
        """With the queue full a further request fails OVERLOADED at once."""
        limiter = self.limiter(limit=1, queue_size=2)
        self.successResultOf(limiter.acquire())
        queued = [limiter.acquire(), limiter.acquire()]
        error = overloaded(self, limiter.acquire())
        self.assertIn("test limit", str(error))
        for d in queued:
            self.assertNoResult(d)
        self.assertEqual(limiter.refused, 1)
        self.clock.advance(10)  # the queued ones time out; nothing else is scheduled
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for d in queued:
            overloaded(self, d)

    def test_no_queue(self):
        """queue_size 0 (or queue_timeout 0) refuses at once when the slots are taken."""
        for limiter in (self.limiter(limit=1, queue_size=0),
                        self.limiter(limit=1, queue_timeout=0)):
            self.successResultOf(limiter.acquire())
            overloaded(self, limiter.acquire())
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self):
        """A waiter still waiting after queue_timeout fails OVERLOADED and leaves the queue."""
        limiter = self.limiter(limit=1, queue_timeout=5.0)
        holder = self.successResultOf(limiter.acquire("alice"))
        d = limiter.acquire("alice")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        overloaded(self, d)
        self.assertEqual(limiter.waiting("alice"), 0)
        holder()
        self.assertEqual(limiter.keys(), [])

    def test_timer_cancelled_on_admission(self):
        """A waiter admitted in time leaves no timer behind."""
        limiter = self.limiter(limit=1)
        holder = self.successResultOf(limiter.acquire())
        d = limiter.acquire()
        holder()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_leaves_the_queue(self):
        """Cancelling a waiter (the user left) takes it out of the queue and its timer off."""
        limiter = self.limiter(limit=1)
        holder = self.successResultOf(limiter.acquire())
        gone, stays = limiter.acquire(), limiter.acquire()
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual(limiter.waiting(), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        holder()
        self.successResultOf(stays)

    def test_cancel_makes_room(self):
        """A cancelled waiter's place in the bounded queue is free again."""
        limiter = self.limiter(limit=1, queue_size=1)
        self.successResultOf(limiter.acquire())
        waiter = limiter.acquire()
        overloaded(self, limiter.acquire())
        waiter.cancel()
        self.failureResultOf(waiter, defer.CancelledError)
        self.assertNoResult(limiter.acquire())

    def test_keys_independent(self):
        """Each key has its own slots and queue."""
        limiter = self.limiter(limit=1)
        self.successResultOf(limiter.acquire("alice"))
        self.assertNoResult(limiter.acquire("alice"))
        self.successResultOf(limiter.acquire("bob"))
        self.assertEqual(limiter.totals(), (2, 1))

    def test_unlimited(self):
        """Limit 0 never waits, and still counts the slots."""
        limiter = self.limiter(limit=0)
        releases = [self.successResultOf(limiter.acquire()) for _ in range(1000)]
        self.assertEqual(limiter.active(), 1000)
        for release in releases:
            release()
        self.assertEqual(limiter.keys(), [])

    def test_release_inside_callback(self):
        """A waiter that gives its slot back from its own callback hands it on in order."""
        limiter = self.limiter(limit=1)
        holder = self.successResultOf(limiter.acquire())
        first, second = limiter.acquire(), limiter.acquire()
        first.addCallback(lambda release: release())
        holder()
        self.successResultOf(second)
        self.assertEqual((limiter.active(), limiter.waiting()), (1, 0))

    def test_configure_raises_limit(self):
        """Raising the limit while running admits waiters at once."""
        limiter = self.limiter(limit=1)
        self.successResultOf(limiter.acquire())
        waits = [limiter.acquire(), limiter.acquire()]
        limiter.configure(limit=3)
        for d in waits:
            self.successResultOf(d)
        self.assertEqual(limiter.active(), 3)

    def test_configure_lowers_limit(self):
        """Lowering the limit keeps holders, and admits nobody until they are under it."""
        limiter = self.limiter(limit=2)
        a, b = (self.successResultOf(limiter.acquire()) for _ in range(2))
        limiter.configure(limit=1)
        waiter = limiter.acquire()
        a()
        self.assertNoResult(waiter)
        b()
        self.successResultOf(waiter)


    def test_key_limit_counts_what_the_key_holds(self):
        """
        A key given a limit of its own (a user's max_streams) counts the
        slots it already holds: set lower than them, it admits nobody until
        the key is under it; lifted, the shared limit counts them again.
        """
        limiter = self.limiter(limit=10, queue_size=0)
        held = [self.successResultOf(limiter.acquire("alice")) for _ in range(5)]
        limiter.set_key_limit("alice", 3, what="max_streams of user alice")
        failure = self.failureResultOf(limiter.acquire("alice"), StreamOpenError)
        self.assertIn("max_streams of user alice", str(failure.value))
        self.successResultOf(limiter.acquire("bob"))  # other keys keep the shared limit
        for release in held[:3]:
            release()
        self.successResultOf(limiter.acquire("alice"))  # 3 held now
        self.assertIsNone(limiter.try_acquire("alice"))
        limiter.set_key_limit("alice", None)
        self.assertEqual(limiter.active("alice"), 3)
        self.assertIsNotNone(limiter.try_acquire("alice"))

    def test_raised_key_limit_admits_waiters(self):
        limiter = self.limiter(limit=10)
        limiter.set_key_limit("alice", 1)
        self.successResultOf(limiter.acquire("alice"))
        waiting = limiter.acquire("alice")
        self.assertNoResult(waiting)
        limiter.set_key_limit("alice", 2)
        self.successResultOf(waiting)


class AcquireAllTests(SynchronousTestCase):
    """acquire_all takes slots from several limiters in order, and all or none."""

    def setUp(self):
        self.clock = Clock()
        self.users = Limiter(self.clock, 1, 10, 5.0, what="users")
        self.listener = Limiter(self.clock, 2, 10, 5.0, what="listener")

    def take(self, user):
        return acquire_all([(self.users, user), (self.listener, None)])

    def test_both(self):
        """One release gives back both slots."""
        release = self.successResultOf(self.take("alice"))
        self.assertEqual((self.users.active("alice"), self.listener.active()), (1, 1))
        release()
        self.assertEqual((self.users.keys(), self.listener.keys()), ([], []))

    def test_second_refused(self):
        """A refusal by the second limiter gives the first slot back."""
        self.listener.configure(limit=1, queue_size=0)
        self.successResultOf(self.take("alice"))
        overloaded(self, self.take("bob"))
        self.assertEqual(self.users.active("bob"), 0)

    def test_cancel_while_waiting_for_second(self):
        """Cancelling while the second limiter queues it leaves that queue and frees the first."""
        self.successResultOf(self.take("alice"))
        self.successResultOf(self.take("bob"))
        d = self.take("carol")
        self.assertEqual((self.users.active("carol"), self.listener.waiting()), (1, 1))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((self.users.active("carol"), self.listener.waiting()), (0, 0))

    def test_user_waits_without_listener_slot(self):
        """A user waiting on their own limit holds no slot of the listener."""
        self.successResultOf(self.take("alice"))
        waiting = self.take("alice")
        self.assertNoResult(waiting)
        self.assertEqual(self.listener.active(), 1)
        self.successResultOf(self.take("bob"))


def limited_setup(limit=1, queue_size=10, queue_timeout=5.0):
    """A clock, a mux pair with a tunnel in a registry, and a limiter of C{limit}."""
    clock = Clock()
    pair = MuxPair()
    registry = TunnelPool(clock)
    registry.add(tunnel_for(pair))
    limiter = Limiter(clock, limit, queue_size, queue_timeout)

    def endpoint():
        return TunnelEndpoint(registry, clock, "default", "target.example", 443,
                              admit=lambda: limiter.acquire("alice"))

    return clock, pair, limiter, endpoint


class LimitedEndpointTests(SynchronousTestCase):
    """A TunnelEndpoint with C{admit} holds a slot from open to close."""

    def connect(self, pair, endpoint):
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        if pair.requests and not pair.requests[-1].closed and pair.requests[-1].protocol is None:
            pair.requests[-1].accept(Recorder())
            pair.pump()
        return d

    def test_slot_held_until_close(self):
        """The second stream is not even asked for until the first closes."""
        clock, pair, limiter, endpoint = limited_setup(limit=1)
        first = self.successResultOf(self.connect(pair, endpoint()))
        second = self.connect(pair, endpoint())
        self.assertNoResult(second)
        self.assertEqual(len(pair.requests), 1)
        first.transport.loseConnection()
        pair.pump()
        clock.advance(0)  # slots go back one turn after the close
        pair.pump()
        self.assertEqual(len(pair.requests), 2)
        pair.requests[1].accept(Recorder())
        pair.pump()
        self.successResultOf(second)
        self.assertEqual(limiter.active("alice"), 1)

    def test_queue_timeout(self):
        """A stream waiting longer than queue_timeout fails OVERLOADED and is never opened."""
        clock, pair, limiter, endpoint = limited_setup(limit=1, queue_timeout=2.0)
        self.successResultOf(self.connect(pair, endpoint()))
        d = self.connect(pair, endpoint())
        clock.advance(2.0)
        overloaded(self, d)
        self.assertEqual(len(pair.requests), 1)

    def test_user_leaves_queue(self):
        """Cancelling the connect of a waiting stream (the user left) leaves the queue."""
        clock, pair, limiter, endpoint = limited_setup(limit=1)
        self.successResultOf(self.connect(pair, endpoint()))
        d = self.connect(pair, endpoint())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(limiter.waiting("alice"), 0)

    def test_failed_open_releases(self):
        """A stream the client refuses gives its slot back."""
        clock, pair, limiter, endpoint = limited_setup(limit=1)
        d = endpoint().connect(RecordingFactory())
        pair.pump()
        pair.requests[0].reject(Reason.CONNECTION_REFUSED)
        pair.pump()
        self.failureResultOf(d, StreamOpenError)
        clock.advance(0)
        self.assertEqual(limiter.active("alice"), 0)

    def test_tunnel_lost_releases(self):
        """Streams lost with their tunnel give their slots back."""
        clock, pair, limiter, endpoint = limited_setup(limit=2)
        for _ in range(2):
            self.successResultOf(self.connect(pair, endpoint()))
        pair.gateway.connection_lost()
        clock.advance(0)
        self.assertEqual(limiter.active("alice"), 0)


class RecordTests(SynchronousTestCase):
    """Streams carry their connection record: created, last active, bytes."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def open(self):
        clock = self.clock
        pair = MuxPair(clock=clock)
        registry = TunnelPool(clock)
        registry.add(tunnel_for(pair))
        endpoint = TunnelEndpoint(registry, clock, "default", "target.example", 443)
        d = endpoint.connect(RecordingFactory())
        pair.pump()
        far = Recorder()
        pair.requests[0].accept(far)
        pair.pump()
        return pair, registry, self.successResultOf(d), far

    def test_record(self):
        """A record shows id, tunnel, target, times and bytes each way."""
        pair, registry, near, far = self.open()
        self.clock.advance(5)
        near.transport.write(b"12345")
        pair.pump()
        self.clock.advance(2)
        far.transport.write(b"abc")
        pair.pump()
        self.assertEqual(record_of(near.transport), StreamRecord(
            stream_id=2, tunnel="tunnel-1", kind="tcp", host="target.example", port=443,
            created=1000.0, last_active=1007.0, bytes_sent=5, bytes_received=3))
        self.assertEqual(gateway_records(registry), [record_of(near.transport)])
        self.assertEqual(record_of(far.transport).last_active, 1007.0)
        self.assertEqual(record_of(near.transport).as_dict()["bytes_sent"], 5)

    def test_notify_closed(self):
        """notify_closed hooks run once when the stream ends, or at once if it has."""
        pair, _, near, _ = self.open()
        calls = []
        near.transport.notify_closed(calls.append)
        near.transport.loseConnection()
        pair.pump()
        self.assertEqual(calls, [near.transport])
        near.transport.notify_closed(calls.append)
        self.assertEqual(calls, [near.transport] * 2)


class DefaultsTests(SynchronousTestCase):
    """
    The shipped limits serve a small office and share a client between users:
    one user's allowance (gateway.max_conns_per_user) is below a client's
    capacity (client.max_concurrent_conns), in the code and in etc/.
    """

    def load(self, *names, text=None):
        if text is not None:
            path = self.mktemp() + ".yaml"
            with open(path, "w") as f:
                f.write(text)
            return load_config(path, check_files=False)
        etc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
        return [load_config(os.path.join(etc, name), check_files=False) for name in names]

    def assert_shared(self, per_user, capacity):
        self.assertGreater(per_user, 0, "max_conns_per_user: 0 lets one user take a client")
        self.assertLess(per_user, capacity)
        # A few people browsing (a browser opens up to 6 connections per host).
        self.assertGreaterEqual(capacity, 1024)

    def test_defaults(self):
        """Keys left out: per-user below the client's capacity."""
        config = self.load(text="gateway: {listen_addr: ':8443', tls_cert: c, tls_key: k, "
                                "auth_username: u, auth_password: p}\n"
                                "client: {gateway_addr: 'gw:8443'}\n")
        self.assert_shared(config.gateway.max_conns_per_user, config.client.max_concurrent_conns)

    def test_example_files(self):
        """The same for the values written in etc/."""
        single, gateway, client = self.load("anyproxy.yaml", "gateway.yaml", "client.yaml")
        self.assert_shared(single.gateway.max_conns_per_user, single.client.max_concurrent_conns)
        self.assert_shared(gateway.gateway.max_conns_per_user, client.client.max_concurrent_conns)
