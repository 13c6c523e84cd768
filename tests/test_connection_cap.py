"""
Tests for L{anyproxy.connection_cap}: the count, the refusals and their
once-per-burst log line, on a C{Clock}.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.connection_cap import LOG_INTERVAL, ConnectionCap, Refused


class ConnectionCapTests(SynchronousTestCase):
    """A cap admits up to its limit, refuses beyond it, and logs refusals once per burst."""

    def setUp(self):
        self.clock = Clock()
        self.warnings = []

        def observe(event):
            if event.get("log_level") is LogLevel.warn and event.get("what") == "test cap":
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_limit(self):
        """Up to the limit are admitted; one more is refused until one leaves."""
        cap = ConnectionCap(2, "test cap", self.clock)
        self.assertEqual([cap.enter(), cap.enter(), cap.enter()], [True, True, False])
        self.assertEqual((cap.count, cap.refused), (2, 1))
        cap.leave()
        self.assertTrue(cap.enter())
        self.assertEqual(cap.count, 2)

    def test_no_cap(self):
        """A limit of 0 admits everybody."""
        cap = ConnectionCap(0, "test cap", self.clock)
        self.assertTrue(all(cap.enter() for _ in range(10000)))
        self.assertEqual(cap.refused, 0)

    def test_leave_never_goes_negative(self):
        """A stray leave does not make room beyond the limit."""
        cap = ConnectionCap(1, "test cap", self.clock)
        cap.leave()
        self.assertEqual([cap.enter(), cap.enter()], [True, False])

    def test_logged_once_per_burst(self):
        """A burst of refusals logs one line; a later one logs again with the count since."""
        cap = ConnectionCap(1, "test cap", self.clock)
        cap.enter()
        for _ in range(500):
            cap.enter()
        self.assertEqual(len(self.warnings), 1)
        self.assertEqual(self.warnings[0]["refused"], 1)
        self.clock.advance(LOG_INTERVAL - 1)
        cap.enter()
        self.assertEqual(len(self.warnings), 1)
        self.clock.advance(1)
        cap.enter()
        self.assertEqual(len(self.warnings), 2)
        self.assertEqual(self.warnings[1]["refused"], 501)
        self.assertEqual(cap.refused, 502)


class RefusedTests(SynchronousTestCase):
    """The protocol built for a refused connection closes it at once."""

    def test_closes(self):
        transport = StringTransport()
        Refused().makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
