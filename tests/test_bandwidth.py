# -*- test-case-name: tests.test_bandwidth -*-
"""
The bandwidth cap (L{anyproxy.bandwidth}): the token bucket and shaper
alone, then on a L{anyproxy.tunnel.stream.Stream} between two muxes on a
L{Clock}.
"""

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.bandwidth import (BandwidthLimits, MIN_QUANTUM, MIN_WAIT, Shaper, ShapedFlow,
                                TokenBucket)
from anyproxy.tunnel import frames
from tests.test_mux import FakeProducer, HalfCloseRecorder, MuxPair, Recorder, of_type, pattern

# (seconds to wait, bytes pushed) steps; the pushes are numbered bytes, so
# a loss or a reordering shows.
_STEPS = st.lists(st.tuples(st.floats(min_value=0, max_value=2, allow_nan=False),
                            st.integers(min_value=0, max_value=50000)),
                  min_size=1, max_size=40)


class TokenBucketTests(SynchronousTestCase):
    """A bucket gives C{rate} tokens a second, up to C{burst}, and starts full."""

    def test_starts_full(self):
        """A new bucket has its burst (one second's worth by default)."""
        bucket = TokenBucket(1000, now=0)
        self.assertEqual(bucket.burst, 1000)
        self.assertEqual(bucket.take(5000, 0), 1000)
        self.assertEqual(bucket.take(1, 0), 0)

    def test_refills_at_rate(self):
        """Tokens come back at the rate, never past the burst."""
        bucket = TokenBucket(1000, now=0, burst=500)
        bucket.take(500, 0)
        self.assertEqual(bucket.available(0.25), 250)
        self.assertEqual(bucket.wait(500, 0.25), 0.25)
        self.assertEqual(bucket.available(100), 500)

    def test_wait_is_capped_at_the_burst(self):
        """Asking for more than the burst waits only for a full bucket."""
        bucket = TokenBucket(1000, now=0, burst=100)
        bucket.take(100, 0)
        self.assertAlmostEqual(bucket.wait(10 ** 6, 0), 0.1)

    def test_unlimited(self):
        """Rate 0 grants everything at once."""
        bucket = TokenBucket(0, now=0)
        self.assertEqual(bucket.take(10 ** 9, 0), 10 ** 9)
        self.assertEqual(bucket.wait(10 ** 9, 0), 0)

    def test_configure(self):
        """A new rate keeps the tokens earned, up to the new burst; from unlimited it starts full."""
        bucket = TokenBucket(1000, now=0)
        bucket.take(1000, 0)
        bucket.configure(100, now=0.5)
        self.assertEqual(bucket.available(0.5), 100)
        bucket = TokenBucket(0, now=0)
        bucket.configure(100, now=3)
        self.assertEqual(bucket.available(3), 100)


class ShaperTests(SynchronousTestCase):
    """A shaper releases what it holds in order, as the bucket allows."""

    @settings(max_examples=200, deadline=None)
    @given(rate=st.integers(min_value=1, max_value=10 ** 6),
           burst=st.integers(min_value=1, max_value=10 ** 6), steps=_STEPS)
    def test_never_above_the_cap_nothing_lost(self, rate, burst, steps):
        """
        By time t no more than rate * t + burst bytes come out; everything
        pushed comes out, in order, once there was time for it.
        """
        # A bucket of a few bytes releases a few bytes a step: keep the steps
        # to drain everything bounded (a tiny burst with megabytes pushed ran
        # for hours).
        assume(sum(size for _, size in steps) <= 4000 * min(burst, MIN_QUANTUM))
        bucket = TokenBucket(rate, now=0.0, burst=burst)
        shaper = Shaper(bucket)
        now, pushed, released, counter, out = 0.0, [], [], 0, 0
        for wait, size in steps:
            now += wait
            data = bytes((counter + i) % 251 for i in range(size))
            counter += size
            pushed.append(data)
            shaper.push(data)
            for chunk in shaper.pull(now):
                released.append(bytes(chunk))
                out += len(chunk)
            self.assertLessEqual(out, rate * now + burst + 1e-6 * (rate * now + burst))
        while shaper.held:
            wait = shaper.wait(now)
            self.assertGreaterEqual(wait, 0)
            now += max(wait, MIN_WAIT)
            for chunk in shaper.pull(now):
                released.append(bytes(chunk))
                out += len(chunk)
            self.assertLessEqual(out, rate * now + burst + 1e-6 * (rate * now + burst))
        self.assertEqual(b"".join(released), b"".join(pushed))
        self.assertIsNone(shaper.wait(now))

    def test_quantum(self):
        """Nothing is released until a quantum (or all that is held) may go."""
        bucket = TokenBucket(100000, now=0, burst=100000)
        bucket.take(100000, 0)
        shaper = Shaper(bucket)
        self.assertEqual(shaper.quantum, 2000)  # rate / 50
        shaper.push(b"x" * 5000)
        self.assertEqual(shaper.pull(0.01), [])  # 1000 tokens: less than a quantum
        self.assertEqual(sum(map(len, shaper.pull(0.02))), 2000)
        shaper.push(b"")
        self.assertEqual(shaper.held, 3000)

    def test_small_burst(self):
        """A bucket smaller than the quantum still lets everything through."""
        bucket = TokenBucket(10, now=0, burst=3)
        shaper = Shaper(bucket)
        shaper.push(b"abcdefg")
        self.assertEqual(b"".join(map(bytes, shaper.pull(0))), b"abc")
        self.assertEqual(b"".join(map(bytes, shaper.pull(0.3))), b"def")
        self.assertEqual(b"".join(map(bytes, shaper.pull(0.4))), b"g")


class ShapedFlowTests(SynchronousTestCase):
    """A shaped flow delivers on its own timer."""

    def test_timer_and_when_empty(self):
        """What the bucket holds back comes from a timer; when_empty fires after the last byte."""
        clock = Clock()
        flow = ShapedFlow(clock, TokenBucket(1000, now=0, burst=1000))
        delivered, empty = [], []
        flow.attach(lambda chunks: delivered.extend(bytes(c) for c in chunks))
        flow.push(b"a" * 1500)
        self.assertEqual(b"".join(delivered), b"a" * 1000)
        flow.when_empty(lambda: empty.append(True))
        flow.push(b"b" * 10)  # after what waits: order is kept
        clock.advance(0.5)
        self.assertEqual(b"".join(delivered), b"a" * 1000)  # 500 tokens: 510 wait
        clock.advance(0.01)
        self.assertEqual(b"".join(delivered), b"a" * 1500 + b"b" * 10)
        self.assertEqual(empty, [True])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self):
        """A cancelled flow drops what it holds and its timer."""
        clock = Clock()
        flow = ShapedFlow(clock, TokenBucket(1000, now=0, burst=10))
        flow.attach(lambda chunks: None)
        flow.push(b"x" * 100)
        flow.cancel()
        self.assertEqual((flow.held, clock.getDelayedCalls()), (0, []))


class StreamShapingTests(SynchronousTestCase):
    """A capped stream sends and delivers at the cap, by backpressure, losing nothing."""

    def capped_pair(self, rate=100000):
        pair = MuxPair()
        opener, opener_protocol, acceptor, acceptor_protocol = pair.open(
            opener_protocol=HalfCloseRecorder(), acceptor_protocol=HalfCloseRecorder())
        limits = BandwidthLimits(pair.clock)
        limits.configure({"bob": rate, "eve": 0})
        limits.shape("bob", opener)
        return pair, opener, opener_protocol, acceptor, acceptor_protocol, limits

    def advance(self, pair, seconds, step=0.01):
        for _ in range(int(seconds / step)):
            pair.clock.advance(step)
            pair.pump()

    def test_upload(self):
        """
        Writes go out at the cap: the producer is paused while the cap holds
        them, the FIN waits for the last byte.
        """
        pair, opener, _, _, acceptor_protocol, _ = self.capped_pair()
        producer = FakeProducer()
        opener.registerProducer(producer, True)
        data = pattern(300000)
        opener.write(data)
        opener.loseWriteConnection()
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), 100000)  # the burst
        self.assertTrue(producer.paused)
        self.assertNotIn(("read-closed",), acceptor_protocol.events)
        self.advance(pair, 1.0)
        self.assertLessEqual(len(acceptor_protocol.received), 200000 + 2000)
        self.advance(pair, 1.1)
        self.assertEqual(acceptor_protocol.received, data)
        self.assertEqual(acceptor_protocol.events[-1], ("read-closed",))
        self.assertFalse(producer.paused)

    def test_download(self):
        """
        Received bytes are delivered at the cap and credited only then, so
        the sender stops at its window; the FIN comes after the last byte.
        """
        pair, opener, opener_protocol, acceptor, _, _ = self.capped_pair()
        data = pattern(3 * 1024 * 1024)
        acceptor.write(data)
        acceptor.loseWriteConnection()
        pair.pump()
        self.assertEqual(len(opener_protocol.received), 100000)
        self.assertGreater(acceptor.queued_bytes, 0)  # held back by the window
        self.assertEqual(of_type(pair.sent_by_gateway, frames.Credit), [])
        self.advance(pair, 2.0)
        self.assertLessEqual(len(opener_protocol.received), 300000 + 2000)
        self.advance(pair, 29.0, step=0.1)
        self.assertEqual(opener_protocol.received, data)
        self.assertEqual(opener_protocol.events[-1], ("read-closed",))
        self.assertEqual(opener.receive_window, pair.gateway.window)  # never grew

    def test_download_after_the_user_half_closed(self):
        """
        The user half-closes first (a request, then EOF): the answer and its
        FIN close the stream both ways while the cap still holds most of
        it; all of it is delivered, then the close.  A CREDIT crossing our
        FIN meanwhile is ignored, not a protocol error.
        """
        pair, opener, opener_protocol, acceptor, _, _ = self.capped_pair(rate=10000)
        opener.loseWriteConnection()
        pair.pump()
        data = pattern(50000)
        acceptor.write(data)
        acceptor.loseWriteConnection()
        pair.pump()
        self.assertEqual(len(opener_protocol.received), 10000)
        pair.client.send_credit(acceptor.stream_id, 1000)
        pair.pump()
        self.advance(pair, 5.0, step=0.1)
        self.assertEqual(opener_protocol.received, data)
        self.assertEqual(opener_protocol.events[-1], ("lost", error.ConnectionDone))
        self.assertEqual((pair.gateway_errors, pair.client_errors), ([], []))

    def test_reset_while_the_cap_delivers(self):
        """Closed both ways, the cap still delivering: a reset (a kick) ends it at once."""
        pair, opener, opener_protocol, acceptor, _, _ = self.capped_pair(rate=10000)
        opener.loseWriteConnection()
        acceptor.write(pattern(50000))
        acceptor.loseWriteConnection()
        pair.pump()
        opener.reset()
        self.assertEqual(opener_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_tunnel_lost_while_the_cap_delivers(self):
        """Closed both ways, the cap still delivering: a lost tunnel ends it with ConnectionLost."""
        pair, opener, opener_protocol, acceptor, _, _ = self.capped_pair(rate=10000)
        opener.loseWriteConnection()
        acceptor.write(pattern(50000))
        acceptor.loseWriteConnection()
        pair.pump()
        pair.gateway.connection_lost()
        self.assertEqual(opener_protocol.lost_reason, error.ConnectionLost)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_reset_drops_held_and_timers(self):
        """A reset stream lets go of what the cap held and of its timers."""
        pair, opener, _, acceptor, acceptor_protocol, _ = self.capped_pair(rate=1000)
        opener.write(b"x" * 5000)
        acceptor.write(b"y" * 5000)
        pair.pump()
        opener.reset()
        pair.pump()
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_cap_lifted_then_set_again(self):
        """
        1000 -> 0 -> 500 B/s by reloads: the open stream goes unlimited, then
        is held to 500 again (its buckets are kept, not replaced).
        """
        pair, opener, _, _, acceptor_protocol, limits = self.capped_pair(rate=1000)
        limits.configure({"bob": 0})
        opener.write(pattern(20000))
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), 20000)
        limits.configure({"bob": 500})
        opener.write(pattern(20000))
        self.advance(pair, 2.0, step=0.1)
        self.assertLessEqual(len(acceptor_protocol.received), 20000 + 500 + 2 * 500 + 100)

    def test_cap_set_on_a_stream_opened_without_one(self):
        """A stream opened while its user had no cap is held to one set later (shape then)."""
        pair = MuxPair()
        opener, _, _, acceptor_protocol = pair.open(acceptor_protocol=Recorder())
        limits = BandwidthLimits(pair.clock)
        limits.configure({"bob": 0})
        limits.shape("bob", opener)
        self.assertFalse(opener.shaped)
        limits.configure({"bob": 1000})
        limits.shape("bob", opener)
        self.assertTrue(opener.shaped)
        limits.shape("bob", opener)  # once only
        opener.write(pattern(50000))
        self.advance(pair, 1.0, step=0.1)
        self.assertLessEqual(len(acceptor_protocol.received), 1000 + 1000 + 100)

    def test_uncapped_user(self):
        """A user without a cap gets no shaping at all."""
        pair = MuxPair()
        opener, _, _, acceptor_protocol = pair.open(acceptor_protocol=Recorder())
        limits = BandwidthLimits(pair.clock)
        limits.configure({"eve": 0})
        limits.shape("eve", opener)
        opener.write(pattern(500000))
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), 500000)

    def test_reload_changes_the_rate(self):
        """A reload sets a new rate for open streams (within the wait already timed); 0 lifts the cap."""
        pair, opener, _, _, acceptor_protocol, limits = self.capped_pair(rate=1000)
        opener.write(pattern(100000))
        pair.pump()
        self.assertEqual(len(acceptor_protocol.received), 1000)
        limits.configure({"bob": 0})
        self.advance(pair, 1.0)
        self.assertEqual(len(acceptor_protocol.received), 100000)
