"""Tests for L{anyproxy.login_throttle}."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.login_throttle import FIRST_DELAY, LoginThrottle, source_address, source_key


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class LoginThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.throttle = LoginThrottle(failures=5, window=60, block=300, max_delay=2.0,
                                      clock=self.clock)

    def test_first_failure_not_delayed(self):
        self.assertEqual(self.throttle.failed("1.2.3.4", "bob"), 0.0)

    def test_repeated_failures_delayed_growing_and_capped(self):
        throttle = LoginThrottle(failures=100, clock=self.clock, max_delay=2.0)
        delays = [throttle.failed("1.2.3.4", "bob") for _ in range(10)]
        self.assertEqual(delays[:4], [0.0, FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY])
        self.assertEqual(max(delays), 2.0)
        self.assertEqual(delays, sorted(delays))

    def test_block_after_failures(self):
        for _ in range(4):
            self.throttle.failed("1.2.3.4", "bob")
            self.assertFalse(self.throttle.check("1.2.3.4").blocked)
        self.throttle.failed("1.2.3.4", "bob")
        verdict = self.throttle.check("1.2.3.4")
        self.assertTrue(verdict.blocked)
        self.assertEqual(verdict.retry_after, 300)
        self.assertEqual(self.throttle.blocks, 1)
        self.clock.now += 299
        self.assertTrue(self.throttle.check("1.2.3.4").blocked)
        self.clock.now += 2
        self.assertFalse(self.throttle.check("1.2.3.4").blocked)

    def test_other_sources_unaffected(self):
        for _ in range(20):
            self.throttle.failed("1.2.3.4", "bob")
        self.assertFalse(self.throttle.check("5.6.7.8").blocked)

    def test_source_key(self):
        """
        A source is an IPv4 address, also when a dual-stack listener sees it
        IPv4-mapped, or an IPv6 /64: another address of the same /64 does
        not start afresh.
        """
        from twisted.internet.address import IPv6Address
        from twisted.internet.testing import StringTransport
        self.assertEqual(source_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(source_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(source_key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_key(""), "")
        for host in ("2001:db8::1", "2001:db8::2:3"):
            transport = StringTransport(peerAddress=IPv6Address("TCP", host, 40000))
            for _ in range(3):
                self.throttle.failed(source_address(transport), "bob")
        self.assertTrue(self.throttle.check(source_key("2001:db8::ffff")).blocked)
        self.assertFalse(self.throttle.check(source_key("2001:db8:0:1::1")).blocked)

    def test_name_never_blocked_only_delayed(self):
        """Guesses at bob's name from many sources never block bob's own source."""
        for i in range(50):
            self.throttle.failed("10.0.0.%d" % (i,), "bob")
        self.assertFalse(self.throttle.check("192.0.2.1").blocked)
        # bob's correct login is not delayed: only failures are.
        self.throttle.succeeded("192.0.2.1", "bob")
        self.assertFalse(self.throttle.check("192.0.2.1").blocked)
        # a failure for the attacked name is delayed even from a new source
        self.assertGreater(self.throttle.failed("192.0.2.9", "bob"), 0)

    def test_window_forgets(self):
        for _ in range(4):
            self.throttle.failed("1.2.3.4", "bob")
        self.clock.now += 61
        self.assertEqual(self.throttle.failed("1.2.3.4", "bob"), 0.0)
        self.assertFalse(self.throttle.check("1.2.3.4").blocked)

    def test_success_forgives_source(self):
        for _ in range(4):
            self.throttle.failed("1.2.3.4", "alice")
        self.throttle.succeeded("1.2.3.4", "alice")
        self.throttle.failed("1.2.3.4", "carol")
        self.assertFalse(self.throttle.check("1.2.3.4").blocked)

    def test_success_does_not_lift_block(self):
        for _ in range(5):
            self.throttle.failed("1.2.3.4", "bob")
        self.throttle.succeeded("1.2.3.4", "bob")
        self.assertTrue(self.throttle.check("1.2.3.4").blocked)

    def test_off(self):
        throttle = LoginThrottle(failures=0, clock=self.clock)
        for _ in range(100):
            self.assertEqual(throttle.failed("1.2.3.4", "bob"), 0.0)
        self.assertFalse(throttle.check("1.2.3.4").blocked)

    def test_memory_bounded(self):
        throttle = LoginThrottle(clock=self.clock, max_tracked=100)
        for i in range(1000):
            throttle.failed("10.%d.%d.1" % (i // 256, i % 256), "user%d" % (i,))
        self.assertEqual(throttle.tracked(), (100, 100))

    def test_block_logged_once_without_password(self):
        events = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(12):
            self.throttle.failed("1.2.3.4", "bob")
        blocks = [e for e in events if e.get("event") == "login_blocked"]
        self.assertEqual(len(blocks), 1)
        self.assertEqual(blocks[0]["source"], "1.2.3.4")

    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(),
                              st.floats(0, 30)), max_size=60))
    def test_invariants(self, steps):
        """Delays stay within bounds; a blocked source is refused until its block ends."""
        clock = Clock()
        throttle = LoginThrottle(failures=4, window=20, block=50, max_delay=1.5, clock=clock)
        blocked_until = {}
        for source, name, good, advance in steps:
            clock.now += advance
            source = "10.0.0.%d" % (source,)
            verdict = throttle.check(source)
            expect_blocked = blocked_until.get(source, 0) > clock.now
            self.assertEqual(verdict.blocked, expect_blocked)
            if verdict.blocked:
                continue
            if good:
                throttle.succeeded(source, "u%d" % (name,))
            else:
                delay = throttle.failed(source, "u%d" % (name,))
                self.assertTrue(0 <= delay <= 1.5)
                if throttle.check(source).blocked and source not in blocked_until or \
                        throttle.check(source).blocked and blocked_until[source] <= clock.now:
                    blocked_until[source] = clock.now + 50
