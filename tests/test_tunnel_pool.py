# -*- test-case-name: tests.test_tunnel_pool -*-
"""
Tests for L{anyproxy.gateway.tunnel_pool}: tunnel choice and waiting for a tunnel.
"""

import collections
import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from anyproxy.errors import Reason, StreamOpenError
from anyproxy.gateway.tunnel_pool import Tunnel, TunnelPool
from anyproxy.interfaces import ITunnelPool


# -- fakes ----------------------------------------------------------------------

class FakeMux:
    """Stands in for a L{anyproxy.tunnel.mux.Mux}: only C{stream_count} is read."""

    def __init__(self, stream_count=0):
        self.stream_count = stream_count


def tunnel(client_id, group="default", streams=0):
    """A L{Tunnel} of C{group} over a L{FakeMux} with C{streams} open streams."""
    return Tunnel(client_id=client_id, group=group, mux=FakeMux(streams))


def registry(*tunnels, balance="least_streams", clock=None, rng=random):
    """A L{TunnelPool} holding C{tunnels}."""
    result = TunnelPool(clock if clock is not None else Clock(), balance=balance, rng=rng)
    for each in tunnels:
        result.add(each)
    return result


def picks(pool, count, group="default"):
    """How often each tunnel's client_id is picked in C{count} picks."""
    return collections.Counter(pool.pick(group).client_id for _ in range(count))


class FixedRandom:
    """A C{random}-like object whose C{choice} returns a set index in turn, and records the lists."""

    def __init__(self, indexes):
        self.indexes = list(indexes)
        self.choices = []

    def choice(self, sequence):
        self.choices.append(list(sequence))
        return sequence[self.indexes.pop(0)]


# -- tests ----------------------------------------------------------------------

class GoAwayMux(FakeMux):
    """A L{FakeMux} that can send GOAWAY: records it in C{events}, then drains."""

    def __init__(self, events):
        super().__init__()
        self.events = events
        self.draining = False

    def go_away(self, reason):
        self.events.append(("go_away", reason))
        self.draining = True


class TunnelTests(SynchronousTestCase):
    """A L{Tunnel} reports its mux's stream count and closes with a GOAWAY."""

    def test_active_streams(self):
        """active_streams follows the mux's stream_count."""
        each = tunnel("a", streams=3)
        self.assertEqual(each.active_streams, 3)
        each.mux.stream_count = 5
        self.assertEqual(each.active_streams, 5)

    def test_go_away(self):
        """go_away sends GOAWAY now and drops the connection on a later reactor turn."""
        clock, events = Clock(), []
        each = Tunnel("a", "default", GoAwayMux(events), close=lambda: events.append("close"))
        done = each.go_away(clock, Reason.NOT_ALLOWED)
        self.assertEqual(events, [("go_away", Reason.NOT_ALLOWED)])
        self.assertTrue(each.draining)
        self.assertNoResult(done)
        clock.advance(0)
        self.assertEqual(events, [("go_away", Reason.NOT_ALLOWED), "close"])
        self.successResultOf(done)

    def test_go_away_without_goaway_frame(self):
        """A mux that cannot send GOAWAY: the connection is dropped at once."""
        closed = []
        each = Tunnel("a", "default", FakeMux(), close=lambda: closed.append(True))
        self.successResultOf(each.go_away(Clock()))
        self.assertEqual(closed, [True])
        self.assertFalse(each.draining)


class StrategyTests(SynchronousTestCase):
    """The balance strategies choose as documented."""

    def test_unknown_strategy(self):
        """An unknown strategy name raises ValueError naming it."""
        exc = self.assertRaises(ValueError, TunnelPool, Clock(), balance="fastest")
        self.assertIn("fastest", str(exc))

    def test_strategies_accepted(self):
        """Every documented strategy is accepted."""
        for name in ("least_streams", "round_robin", "random"):
            self.assertEqual(TunnelPool(Clock(), balance=name).balance, name)

    def test_default_is_least_streams(self):
        """Without a strategy the registry balances by least streams."""
        self.assertEqual(TunnelPool(Clock()).balance, "least_streams")

    def test_least_streams_fewest(self):
        """least_streams picks the tunnel with the fewest open streams."""
        pool = registry(tunnel("busy", streams=7), tunnel("idle", streams=1),
                        tunnel("medium", streams=4))
        self.assertEqual(picks(pool, 10), {"idle": 10})

    def test_least_streams_follows_counts(self):
        """When stream counts change, least_streams follows them."""
        busy, idle = tunnel("busy", streams=7), tunnel("idle", streams=1)
        pool = registry(busy, idle)
        self.assertIs(pool.pick("default"), idle)
        idle.mux.stream_count = 9
        self.assertIs(pool.pick("default"), busy)

    def test_least_streams_rotates_ties(self):
        """Tunnels tied on fewest streams are picked in turn, not always the first."""
        pool = registry(tunnel("a", streams=2), tunnel("b", streams=2), tunnel("c", streams=5))
        self.assertEqual(picks(pool, 10), {"a": 5, "b": 5})

    def test_least_streams_even_spread(self):
        """With N equal tunnels, N*100 picks give each exactly 100."""
        for count in (1, 2, 3, 4, 7):
            tunnels = [tunnel("t%d" % (i,), streams=3) for i in range(count)]
            pool = registry(*tunnels)
            self.assertEqual(picks(pool, count * 100),
                             {each.client_id: 100 for each in tunnels})

    def test_least_streams_even_spread_with_counting(self):
        """When each pick opens a stream, N*100 picks still spread evenly."""
        tunnels = [tunnel("t%d" % (i,)) for i in range(5)]
        pool = registry(*tunnels)
        counts = collections.Counter()
        for _ in range(500):
            chosen = pool.pick("default")
            chosen.mux.stream_count += 1
            counts[chosen.client_id] += 1
        self.assertEqual(counts, {each.client_id: 100 for each in tunnels})

    def test_round_robin(self):
        """round_robin cycles through the tunnels regardless of stream counts."""
        tunnels = [tunnel("a", streams=50), tunnel("b"), tunnel("c", streams=9)]
        pool = registry(*tunnels, balance="round_robin")
        sequence = [pool.pick("default").client_id for _ in range(6)]
        self.assertEqual(sorted(sequence[:3]), ["a", "b", "c"])
        self.assertEqual(sequence[3:], sequence[:3])
        self.assertEqual(picks(pool, 300), {"a": 100, "b": 100, "c": 100})

    def test_random(self):
        """random delegates the choice among the group's tunnels to the rng."""
        tunnels = [tunnel("a"), tunnel("b", streams=20), tunnel("c")]
        rng = FixedRandom([1, 1, 0, 2])
        pool = registry(*tunnels, balance="random", rng=rng)
        chosen = [pool.pick("default").client_id for _ in range(4)]
        self.assertEqual(chosen, ["b", "b", "a", "c"])
        self.assertEqual(rng.choices, [tunnels] * 4)

    def test_random_seeded(self):
        """random with a seeded rng picks only tunnels of the group, and all of them."""
        tunnels = [tunnel("a"), tunnel("b"), tunnel("c")]
        pool = registry(*tunnels, tunnel("x", group="other"), balance="random",
                        rng=random.Random(1234))
        self.assertEqual(set(picks(pool, 300)), {"a", "b", "c"})

    def test_single_tunnel(self):
        """Every strategy returns the only tunnel there is."""
        for name in TunnelPool.STRATEGIES:
            only = tunnel("only")
            pool = registry(only, balance=name)
            self.assertEqual([pool.pick("default") for _ in range(3)], [only] * 3)


class PoolTests(SynchronousTestCase):
    """Adding, removing and listing tunnels; groups are separate pools."""

    def test_empty(self):
        """An empty registry picks nothing."""
        self.assertIsNone(registry().pick("default"))

    def test_groups_isolated(self):
        """pick(group) never returns a tunnel of another group, whatever the strategy."""
        for name in TunnelPool.STRATEGIES:
            red = [tunnel("red%d" % (i,), group="red", streams=i) for i in range(3)]
            blue = [tunnel("blue%d" % (i,), group="blue") for i in range(2)]
            pool = registry(*(red + blue), balance=name, rng=random.Random(7))
            for _ in range(60):
                self.assertIn(pool.pick("red"), red)
                self.assertIn(pool.pick("blue"), blue)
            self.assertIsNone(pool.pick("green"))

    def test_remove(self):
        """A removed tunnel is no longer picked."""
        for name in TunnelPool.STRATEGIES:
            a, b = tunnel("a"), tunnel("b")
            pool = registry(a, b, balance=name, rng=random.Random(3))
            pool.remove(a)
            self.assertEqual(set(picks(pool, 20)), {"b"})
            pool.remove(b)
            self.assertIsNone(pool.pick("default"))

    def test_remove_unknown(self):
        """Removing a tunnel that is not registered changes nothing."""
        a = tunnel("a")
        pool = registry(a)
        pool.remove(tunnel("stranger"))
        pool.remove(tunnel("stranger", group="other"))
        self.assertEqual(pool.tunnels(), [a])

    def test_remove_twice(self):
        """Removing the same tunnel twice is harmless."""
        a = tunnel("a")
        pool = registry(a)
        pool.remove(a)
        pool.remove(a)
        self.assertEqual(pool.tunnels(), [])

    def test_tunnels(self):
        """tunnels() lists one group, or all groups without an argument."""
        red, blue = tunnel("r", group="red"), tunnel("b", group="blue")
        pool = registry(red, blue)
        self.assertEqual(pool.tunnels("red"), [red])
        self.assertEqual(pool.tunnels("green"), [])
        self.assertEqual(sorted(t.client_id for t in pool.tunnels()), ["b", "r"])

    def test_tunnels_is_a_copy(self):
        """Changing the returned list does not change the registry."""
        a = tunnel("a")
        pool = registry(a)
        pool.tunnels("default").clear()
        self.assertIs(pool.pick("default"), a)

    def test_provides_interface(self):
        """TunnelPool provides ITunnelPool, the interface every pool user relies on."""
        verifyObject(ITunnelPool, TunnelPool(Clock()))

    def test_draining_not_picked(self):
        """A draining tunnel (GOAWAY sent or received) gets no new streams, but stays listed."""
        for balance in TunnelPool.STRATEGIES:
            draining, other = tunnel("draining"), tunnel("other", streams=5)
            pool = registry(draining, other, balance=balance)
            draining.mux.draining = True
            self.assertEqual(picks(pool, 6), {"other": 6})
            self.assertEqual(len(pool.tunnels()), 2)
            other.mux.draining = True
            self.assertIsNone(pool.pick("default"))

    def test_lost_not_picked(self):
        """A tunnel whose connection is lost (dropped from the pool a turn later) gets no stream."""
        for balance in TunnelPool.STRATEGIES:
            lost, other = tunnel("lost"), tunnel("other", streams=5)
            pool = registry(lost, other, balance=balance)
            lost.mux.lost = True
            self.assertEqual(picks(pool, 6), {"other": 6})

    def test_reload_balance(self):
        """prepare takes gateway.balance aside; apply switches the strategy."""

        class Config:
            class gateway:
                balance = "round_robin"

        pool = registry()
        apply = pool.prepare(Config)
        self.assertEqual(pool.balance, "least_streams")
        self.assertEqual(self.successResultOf(apply()), [])
        self.assertEqual(pool.balance, "round_robin")


class WaitForTests(SynchronousTestCase):
    """wait_for returns a tunnel now, or when one connects, or fails with NO_TUNNEL."""

    def test_existing(self):
        """With a tunnel connected, wait_for fires at once and schedules nothing."""
        clock = Clock()
        a = tunnel("a")
        pool = registry(a, clock=clock)
        self.assertIs(self.successResultOf(pool.wait_for("default", 5)), a)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_arrives_later(self):
        """wait_for fires when a tunnel of the group is added before the timeout."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        clock.advance(4)
        self.assertNoResult(d)
        a = tunnel("a")
        pool.add(a)
        self.assertIs(self.successResultOf(d), a)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)  # the timer is gone: nothing else happens

    def test_other_group_does_not_wake(self):
        """A tunnel of another group does not fire the waiter."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("red", 5)
        pool.add(tunnel("b", group="blue"))
        self.assertNoResult(d)
        red = tunnel("r", group="red")
        pool.add(red)
        self.assertIs(self.successResultOf(d), red)

    def test_several_waiters(self):
        """Every waiter of the group fires when a tunnel arrives."""
        clock = Clock()
        pool = registry(clock=clock)
        waiters = [pool.wait_for("default", 5) for _ in range(3)]
        a = tunnel("a")
        pool.add(a)
        for d in waiters:
            self.assertIs(self.successResultOf(d), a)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout(self):
        """Without a tunnel, wait_for fails with NO_TUNNEL after the timeout."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        exc = self.failureResultOf(d, StreamOpenError).value
        self.assertEqual(exc.reason, Reason.NO_TUNNEL)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_add_after_timeout(self):
        """A tunnel added after a waiter timed out does not touch that waiter."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        clock.advance(5)
        self.failureResultOf(d, StreamOpenError)
        a = tunnel("a")
        pool.add(a)
        self.assertIs(self.successResultOf(pool.wait_for("default", 5)), a)

    def test_zero_timeout(self):
        """A timeout of zero fails at once with NO_TUNNEL and schedules nothing."""
        clock = Clock()
        pool = registry(clock=clock)
        exc = self.failureResultOf(pool.wait_for("default", 0), StreamOpenError).value
        self.assertEqual(exc.reason, Reason.NO_TUNNEL)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self):
        """Cancelling a wait fails it with CancelledError, drops the timer and the waiter."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(pool._waiters.get("default", []), [])

    def test_cancel_then_add(self):
        """A tunnel added after a cancelled wait is simply registered."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        a = tunnel("a")
        pool.add(a)
        clock.advance(10)
        self.assertEqual(pool.tunnels(), [a])

    def test_cancel_one_of_several(self):
        """Cancelling one wait leaves the others waiting with their timers."""
        clock = Clock()
        pool = registry(clock=clock)
        first = pool.wait_for("default", 5)
        second = pool.wait_for("default", 5)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        a = tunnel("a")
        pool.add(a)
        self.assertIs(self.successResultOf(second), a)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_waiter_uses_strategy(self):
        """A woken waiter gets a tunnel chosen by the strategy."""
        clock = Clock()
        pool = registry(clock=clock)
        d = pool.wait_for("default", 5)
        pool.add(tunnel("busy", streams=3))
        busy = self.successResultOf(d)
        pool.add(tunnel("idle"))
        self.assertEqual(busy.client_id, "busy")
        self.assertEqual(self.successResultOf(pool.wait_for("default", 5)).client_id, "idle")


# -- weights and spread ---------------------------------------------------------

def weighted(client_id, weight, group="default", streams=0):
    """A L{tunnel} with a weight."""
    each = tunnel(client_id, group=group, streams=streams)
    each.weight = weight
    return each


def within(testcase, counts, expected, tolerance=0.2):
    """Assert every count is within C{tolerance} (a fraction) of its expected value."""
    for name, want in expected.items():
        got = counts.get(name, 0)
        testcase.assertTrue(abs(got - want) <= tolerance * want,
                            "%s: %d picks, expected %d +-%d%% (%r)"
                            % (name, got, want, tolerance * 100, dict(counts)))


class SpreadTests(SynchronousTestCase):
    """With N equal tunnels, N*100 new streams spread within +-20% of even, for every strategy."""

    def pick_with_streams(self, pool, count):
        """C{count} picks where each picked tunnel opens (keeps) a stream."""
        counts = collections.Counter()
        for _ in range(count):
            chosen = pool.pick("default")
            chosen.mux.stream_count += 1
            counts[chosen.client_id] += 1
        return counts

    def test_even_spread_every_strategy(self):
        """Each strategy gives N equal tunnels 100 +-20 of N*100 picks, counts fixed or growing."""
        for name in TunnelPool.STRATEGIES:
            for count in (2, 3, 5, 8):
                for grow in (False, True):
                    tunnels = [tunnel("t%d" % (i,), streams=2) for i in range(count)]
                    pool = registry(*tunnels, balance=name, rng=random.Random(count))
                    if grow:
                        counts = self.pick_with_streams(pool, count * 100)
                    else:
                        counts = picks(pool, count * 100)
                    within(self, counts, {each.client_id: 100 for each in tunnels})

    def test_exactly_even_when_counts_fixed(self):
        """least_streams and round_robin give N equal tunnels exactly 100 each of N*100."""
        for name in ("least_streams", "round_robin"):
            for count in (2, 3, 5, 8):
                tunnels = [tunnel("t%d" % (i,), streams=4) for i in range(count)]
                pool = registry(*tunnels, balance=name)
                self.assertEqual(picks(pool, count * 100),
                                 {each.client_id: 100 for each in tunnels})

    def test_weights_one_to_three(self):
        """Weights 1:3 give about 1:3 of the picks for every strategy."""
        for name in TunnelPool.STRATEGIES:
            for grow in (False, True):
                light, heavy = weighted("light", 1), weighted("heavy", 3)
                pool = registry(light, heavy, balance=name, rng=random.Random(42))
                if grow:
                    counts = self.pick_with_streams(pool, 400)
                else:
                    counts = picks(pool, 400)
                within(self, counts, {"light": 100, "heavy": 300})

    def test_round_robin_weights_exact_and_interleaved(self):
        """Smooth weighted round robin: 1:3 is exact over 4 picks and never bunches the heavy one."""
        pool = registry(weighted("light", 1), weighted("heavy", 3), balance="round_robin")
        sequence = [pool.pick("default").client_id for _ in range(8)]
        self.assertEqual(sequence[:4], ["heavy", "light", "heavy", "heavy"])
        self.assertEqual(sequence[4:], sequence[:4])

    def test_round_robin_nginx_sequence(self):
        """Weights 5:1:1 give nginx's smooth sequence a a b a c a a."""
        pool = registry(weighted("a", 5), weighted("b", 1), weighted("c", 1),
                        balance="round_robin")
        sequence = "".join(pool.pick("default").client_id for _ in range(7))
        self.assertEqual(sequence, "aabacaa")

    def test_least_streams_divides_by_weight(self):
        """least_streams compares open streams per unit of weight."""
        big, small = weighted("big", 4, streams=6), weighted("small", 1, streams=2)
        pool = registry(big, small)
        self.assertIs(pool.pick("default"), big)  # 6/4 < 2/1
        big.mux.stream_count = 9
        self.assertIs(pool.pick("default"), small)  # 2/1 < 9/4

    def test_fractional_weights(self):
        """Weights need not be integers: 0.5:1.5 is 1:3."""
        pool = registry(weighted("light", 0.5), weighted("heavy", 1.5), balance="round_robin")
        self.assertEqual(picks(pool, 400), {"light": 100, "heavy": 300})

    def test_weighted_random_uses_rng(self):
        """Weighted random maps the rng's draw onto the cumulative weights."""

        class Draws:
            def __init__(self, values):
                self.values = list(values)

            def random(self):
                return self.values.pop(0)

        pool = registry(weighted("a", 1), weighted("b", 3), balance="random",
                        rng=Draws([0.0, 0.24, 0.25, 0.99]))
        self.assertEqual([pool.pick("default").client_id for _ in range(4)],
                         ["a", "a", "b", "b"])

    def test_removed_tunnel_forgets_score(self):
        """A removed tunnel's round robin score is dropped with it."""
        a, b = tunnel("a"), tunnel("b")
        pool = registry(a, b, balance="round_robin")
        picks(pool, 3)
        pool.remove(a)
        self.assertNotIn(a, pool._scores)
        self.assertEqual(picks(pool, 3), {"b": 3})


class TargetWithoutRoutesTests(SynchronousTestCase):
    """A target host changes nothing in a group whose clients announced no routes."""

    def test_same_choices(self):
        """With and without a host, the same tunnels in the same turn (round robin)."""
        with_host = registry(tunnel("a"), tunnel("b"), balance="round_robin")
        without = registry(tunnel("a"), tunnel("b"), balance="round_robin")
        self.assertEqual([with_host.pick("default", "10.9.9.9").client_id for _ in range(4)],
                         [without.pick("default").client_id for _ in range(4)])

    def test_never_unroutable(self):
        """No target is refused for routes in such a group, and nothing is retried."""
        pool = registry(tunnel("a"))
        self.assertFalse(pool.routes_nowhere("default", "anything.example"))
        self.assertEqual(self.successResultOf(pool.wait_for("default", 0, "x.example")).client_id,
                         "a")
        self.assertEqual(pool._routed, {})

    def test_avoid(self):
        """A client to avoid is left out, as on a retry."""
        pool = registry(tunnel("a"), tunnel("b"))
        self.assertEqual({pool.pick("default", "h", avoid="a").client_id for _ in range(3)}, {"b"})
        self.assertIsNone(registry(tunnel("a")).pick("default", avoid="a"))
