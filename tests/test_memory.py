"""Tests for L{anyproxy.memory}."""

import gc
import weakref

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.memory import MALLOC_TRIM, FreezeAfterStartup, ReleaseAfterBursts


class ReleaseAfterBurstsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.calls = []
        self.release = ReleaseAfterBursts(self.clock, burst=3, quiet=5, trim=self.calls.append)

    def test_no_release_for_a_trickle(self):
        for _ in range(2):
            self.release.handshake_done()
            self.clock.advance(10)
        self.assertEqual(self.calls, [])

    def test_once_after_the_burst_is_quiet(self):
        for _ in range(10):
            self.release.handshake_done()
            self.clock.advance(1)
        self.assertEqual(self.calls, [])  # still busy: the timer keeps moving
        self.clock.advance(5)
        self.assertEqual(self.calls, [0])
        self.clock.advance(60)
        self.assertEqual(self.calls, [0])

    def test_stop(self):
        for _ in range(3):
            self.release.handshake_done()
        self.release.stop()
        self.clock.advance(10)
        self.assertEqual(self.calls, [])

    def test_real_trim_runs(self):
        """On glibc the real malloc_trim is found and callable."""
        if MALLOC_TRIM is None:
            raise self.skipTest("no malloc_trim in this C library")
        self.assertIn(MALLOC_TRIM(0), (0, 1))


class FreezeAfterStartupTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.service = FreezeAfterStartup(self.clock)
        # Give the test process's objects back to the collector afterwards.
        self.addCleanup(gc.unfreeze)

    def test_frozen_on_the_first_turn(self):
        """Nothing while services start; on the reactor's first turn, start-up is frozen."""
        self.service.startService()
        self.assertIsNone(self.service.frozen)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.clock.advance(0)
        self.assertGreater(self.service.frozen, 1000)
        self.assertGreater(gc.get_freeze_count(), 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_later_objects_still_collected(self):
        """What is made after the freeze, cyclic garbage included, is collected as before."""
        self.service.startService()
        self.clock.advance(0)

        class Node:
            pass

        node = Node()
        node.self = node
        gone = weakref.ref(node)
        del node
        gc.collect()
        self.assertIsNone(gone())

    def test_stopped_before_the_turn(self):
        self.service.startService()
        self.service.stopService()
        self.clock.advance(0)
        self.assertIsNone(self.service.frozen)
        self.assertEqual(gc.get_freeze_count(), 0)
