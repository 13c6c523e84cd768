# -*- test-case-name: tests.test_client_udp -*-
"""
Tests for L{anyproxy.client.udp}: UDP associations answered by a real
L{Dialer} behind a real L{Mux} pair, sending to UDP echo servers on loopback,
plus a few unit tests of the association on a L{Clock}.
"""

import os
import socket

from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyproxy.client import udp
from anyproxy.access_policy import AccessPolicy, HostRule, LimitRule
from anyproxy.client.dialer import Dialer
from anyproxy.client.udp import TargetAssociation, UdpStats, serves_udp
from anyproxy.errors import Reason, StreamOpenError
from tests.support import StaticResolver
from tests.test_dialer import LoopbackMuxPair


# -- fixtures -------------------------------------------------------------------

class UdpEcho(DatagramProtocol):
    """Sends every datagram back to where it came from."""

    noisy = False

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class DatagramRecorder(Protocol):
    """The gateway side of a udp stream: records datagrams and the end."""

    def __init__(self):
        self.datagrams = []
        self.lost = defer.Deferred()
        self._waiting = []

    def datagram_received(self, host, port, payload):
        self.datagrams.append((host, port, payload))
        waiting, self._waiting = self._waiting, []
        for count, d in waiting:
            if len(self.datagrams) >= count:
                d.callback(self.datagrams[count - 1])
            else:
                self._waiting.append((count, d))

    def wait_for(self, count):
        """A Deferred firing with datagram number C{count} (1-based) once it is in."""
        if len(self.datagrams) >= count:
            return defer.succeed(self.datagrams[count - 1])
        d = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


def policy(forbidden=(), allowed=(), allow_udp=True):
    """An L{AccessPolicy} from rule texts and C{(addr, protocol)} pairs."""
    return AccessPolicy(forbidden=[HostRule.parse(text) for text in forbidden],
                        allowed=[LimitRule.parse(addr, protocol) for addr, protocol in allowed],
                        allow_udp=allow_udp)


def listen_udp(testcase, interface="127.0.0.1"):
    """A UDP echo server on C{interface}, port 0; its port number."""
    # Twisted reads 8 KiB per datagram unless told otherwise: the echo would truncate.
    port = reactor.listenUDP(0, UdpEcho(), interface=interface, maxPacketSize=65535)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def turns(seconds=0.02):
    return task.deferLater(reactor, seconds, lambda: None)


class UdpHarness:
    """A real Dialer answering a gateway mux's udp opens over a loopback mux pair."""

    def __init__(self, testcase, access=None, table=None, **dialer_args):
        self.resolver = StaticResolver(table)
        self.dialer = Dialer(access or AccessPolicy(), reactor, resolver=self.resolver,
                             **dialer_args)
        self.requests = []
        self.pair = LoopbackMuxPair(self._open_request)
        testcase.addCleanup(self.cleanup)

    def _open_request(self, stream):
        self.requests.append(stream)
        self.dialer.handle_open(stream)

    @defer.inlineCallbacks
    def open(self):
        """Open an association; returns C{(gateway stream, recorder, association)}."""
        stream = yield self.pair.gateway.open_stream("udp", "0.0.0.0", 0)
        recorder = DatagramRecorder()
        stream.attach(recorder)
        return stream, recorder, self.requests[-1].protocol

    @defer.inlineCallbacks
    def cleanup(self):
        for request in self.requests:
            if not request.closed:
                request.loseConnection()
        for request in self.requests:
            if isinstance(request.protocol, TargetAssociation):
                yield request.protocol.wait_closed()
        yield turns(0)
        self.pair.cancel_pending()


# -- loopback tests -------------------------------------------------------------

class EchoTests(TestCase):
    """Datagrams reach UDP targets and their replies come back with the target's address."""

    timeout = 10

    @defer.inlineCallbacks
    def test_sizes_ipv4(self):
        """1 B, 1000 B and 60,000 B datagrams echo back intact from 127.0.0.1."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        sizes = [1, 1000, 60000]
        for index, size in enumerate(sizes, 1):
            payload = bytes([index]) * size
            stream.send_datagram("127.0.0.1", echo_port, payload)
            got = yield recorder.wait_for(index)
            self.assertEqual(got, ("127.0.0.1", echo_port, payload))
        self.assertEqual((association.stats.sent, association.stats.received), (3, 3))
        self.assertEqual(association.stats.bytes_sent, sum(sizes))
        stats = harness.dialer.udp_stats
        self.assertEqual((stats.sent, stats.received, stats.associations), (3, 3, 1))

    @defer.inlineCallbacks
    def test_ipv6_and_ipv4(self):
        """One association talks to ::1 and 127.0.0.1, on one socket per family."""
        try:
            echo6 = listen_udp(self, "::1")
        except error.CannotListenError:
            raise self.skipTest("no IPv6 loopback")
        echo4 = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("::1", echo6, b"six" * 20000)
        self.assertEqual((yield recorder.wait_for(1)), ("::1", echo6, b"six" * 20000))
        stream.send_datagram("127.0.0.1", echo4, b"four")
        self.assertEqual((yield recorder.wait_for(2)), ("127.0.0.1", echo4, b"four"))
        stream.send_datagram("[::1]", echo6, b"bracketed")
        self.assertEqual((yield recorder.wait_for(3)), ("::1", echo6, b"bracketed"))
        self.assertEqual(sorted(association._ports), [4, 6])

    @defer.inlineCallbacks
    def test_several_targets(self):
        """Replies from several targets come back on the same association, each labelled."""
        ports = [listen_udp(self) for _ in range(3)]
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        for port in ports:
            stream.send_datagram("127.0.0.1", port, b"to %d" % port)
        yield recorder.wait_for(3)
        self.assertEqual(sorted(recorder.datagrams),
                         sorted(("127.0.0.1", port, b"to %d" % port) for port in ports))
        self.assertEqual(list(association._ports), [4])

    @defer.inlineCallbacks
    def test_domain_resolved_once(self):
        """A domain destination resolves through the resolver, once for repeated sends."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        for index in range(5):
            stream.send_datagram("Target.Test", echo_port, b"by name %d" % index)
        yield recorder.wait_for(5)
        self.assertEqual(sorted(recorder.datagrams),
                         [("127.0.0.1", echo_port, b"by name %d" % i) for i in range(5)])
        stream.send_datagram("target.test", echo_port, b"again")
        yield recorder.wait_for(6)
        self.assertEqual(harness.resolver.asked, ["Target.Test"])

    @defer.inlineCallbacks
    def test_unresolvable_dropped(self):
        """A name that does not resolve is dropped (counted) and remembered briefly."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("nowhere.test", echo_port, b"lost")
        stream.send_datagram("nowhere.test", echo_port, b"lost too")
        stream.send_datagram("127.0.0.1", echo_port, b"fine")
        self.assertEqual((yield recorder.wait_for(1)), ("127.0.0.1", echo_port, b"fine"))
        self.assertEqual(association.stats.dropped_error, 2)
        self.assertEqual(harness.resolver.asked, ["nowhere.test"])

    @defer.inlineCallbacks
    def test_address_restricted(self):
        """Replies from an IP never sent to are dropped; another port of a known IP passes."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("127.0.0.1", echo_port, b"hello")
        yield recorder.wait_for(1)
        relay_port = association._ports[4].getHost().port
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(stranger.close)
        stranger.bind(("127.0.0.2", 0))
        stranger.sendto(b"unsolicited", ("127.0.0.1", relay_port))
        neighbour = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(neighbour.close)
        neighbour.bind(("127.0.0.1", 0))
        neighbour.sendto(b"same ip", ("127.0.0.1", relay_port))
        got = yield recorder.wait_for(2)
        self.assertEqual(got, ("127.0.0.1", neighbour.getsockname()[1], b"same ip"))
        for _ in range(50):
            if association.stats.dropped_unsolicited:
                break
            yield turns()
        self.assertEqual(association.stats.dropped_unsolicited, 1)
        self.assertEqual(len(recorder.datagrams), 2)


class AccessControlTests(TestCase):
    """Every datagram is checked; refused ones are dropped and counted, the rest still flow."""

    timeout = 10

    @defer.inlineCallbacks
    def test_forbidden_address_dropped(self):
        """A forbidden destination is dropped and counted; the association keeps working."""
        echo_port = listen_udp(self)
        blocked_port = listen_udp(self)
        harness = UdpHarness(self, policy(forbidden=["127.0.0.1:%d" % blocked_port]))
        stream, recorder, association = yield harness.open()
        stream.send_datagram("127.0.0.1", blocked_port, b"forbidden")
        stream.send_datagram("127.0.0.1", echo_port, b"allowed")
        self.assertEqual((yield recorder.wait_for(1)), ("127.0.0.1", echo_port, b"allowed"))
        stream.send_datagram("::ffff:127.0.0.1", blocked_port, b"mapped")
        stream.send_datagram("127.0.0.1", echo_port, b"still allowed")
        yield recorder.wait_for(2)
        self.assertEqual([payload for _, _, payload in recorder.datagrams],
                         [b"allowed", b"still allowed"])
        self.assertEqual((association.stats.dropped_acl, association.stats.sent), (2, 2))
        self.assertEqual(harness.dialer.udp_stats.dropped_acl, 2)

    @defer.inlineCallbacks
    def test_forbidden_name_not_resolved(self):
        """A forbidden name is dropped before DNS; a name resolving to a forbidden IP after."""
        echo_port = listen_udp(self)
        harness = UdpHarness(
            self, policy(forbidden=["secret.test", "127.0.0.2"]),
            table={"secret.test": ["127.0.0.1"], "rebind.test": ["127.0.0.1", "127.0.0.2"]})
        stream, recorder, association = yield harness.open()
        stream.send_datagram("secret.test", echo_port, b"no")
        stream.send_datagram("rebind.test", echo_port, b"no either")
        stream.send_datagram("127.0.0.1", echo_port, b"yes")
        yield recorder.wait_for(1)
        self.assertEqual(recorder.datagrams, [("127.0.0.1", echo_port, b"yes")])
        self.assertEqual(harness.resolver.asked, ["rebind.test"])
        self.assertEqual(association.stats.dropped_acl, 2)

    @defer.inlineCallbacks
    def test_allow_list_tcp_entry_does_not_admit_udp(self):
        """With an allow-list, only entries for udp (or both) admit datagrams."""
        udp_port = listen_udp(self)
        tcp_port = listen_udp(self)
        harness = UdpHarness(self, policy(allowed=[("127.0.0.1:%d" % udp_port, "udp"),
                                                   ("127.0.0.1:%d" % tcp_port, "tcp")]))
        stream, recorder, association = yield harness.open()
        stream.send_datagram("127.0.0.1", tcp_port, b"tcp only")
        stream.send_datagram("127.0.0.1", udp_port, b"udp ok")
        yield recorder.wait_for(1)
        self.assertEqual(recorder.datagrams, [("127.0.0.1", udp_port, b"udp ok")])
        self.assertEqual(association.stats.dropped_acl, 1)

    @defer.inlineCallbacks
    def test_allow_list_without_udp_rejects_open(self):
        """An allow-list with no udp entry refuses the association PROTOCOL_NOT_ALLOWED."""
        harness = UdpHarness(self, policy(allowed=[("127.0.0.1", "tcp")]))
        refused = yield self.assertFailure(harness.open(), StreamOpenError)
        self.assertIs(refused.reason, Reason.PROTOCOL_NOT_ALLOWED)
        self.assertEqual(harness.dialer.active, 0)

    @defer.inlineCallbacks
    def test_allow_udp_false_rejects_open(self):
        """allow_udp False refuses the association PROTOCOL_NOT_ALLOWED."""
        harness = UdpHarness(self, policy(allow_udp=False))
        refused = yield self.assertFailure(harness.open(), StreamOpenError)
        self.assertIs(refused.reason, Reason.PROTOCOL_NOT_ALLOWED)
        self.assertEqual(harness.dialer.active, 0)

    @defer.inlineCallbacks
    def test_send_error_survives(self):
        """A datagram the socket refuses to send (broadcast, port 0) is counted, not fatal."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("255.255.255.255", 9, b"broadcast")
        stream.send_datagram("127.0.0.1", 0, b"port zero")
        stream.send_datagram("127.0.0.1", echo_port, b"ok")
        self.assertEqual((yield recorder.wait_for(1)), ("127.0.0.1", echo_port, b"ok"))
        self.assertEqual(association.stats.dropped_error, 2)
        association._ports[4].protocol.connectionRefused()  # the ICMP path
        self.assertEqual(association.stats.dropped_error, 3)


class LifecycleTests(TestCase):
    """Associations hold a slot while open and release every socket when they end."""

    timeout = 20

    @defer.inlineCallbacks
    def test_overloaded(self):
        """At max_streams, with no queue, the next association is refused OVERLOADED; closing
        frees the slot."""
        harness = UdpHarness(self, max_streams=1, queue_size=0)
        stream, recorder, _ = yield harness.open()
        self.assertEqual(harness.dialer.active, 1)
        refused = yield self.assertFailure(harness.open(), StreamOpenError)
        self.assertIs(refused.reason, Reason.OVERLOADED)
        stream.loseConnection()
        yield recorder.lost
        for _ in range(50):
            if not harness.dialer.active:
                break
            yield turns()
        self.assertEqual(harness.dialer.active, 0)
        yield harness.open()

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        """An association with no traffic for idle_timeout seconds is closed by the client."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self, idle_timeout=0.3)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("127.0.0.1", echo_port, b"x")
        yield recorder.wait_for(1)
        yield recorder.lost
        yield association.wait_closed()
        self.assertEqual(harness.dialer.active, 0)
        self.assertEqual(association._ports, {})

    @defer.inlineCallbacks
    def test_tunnel_loss(self):
        """When the tunnel dies the association ends and its sockets close."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        stream, recorder, association = yield harness.open()
        stream.send_datagram("127.0.0.1", echo_port, b"x")
        yield recorder.wait_for(1)
        harness.pair.client.connection_lost()
        yield association.wait_closed()
        self.assertEqual(harness.dialer.active, 0)

    @defer.inlineCallbacks
    def test_no_leaked_sockets(self):
        """50 associations opened, used and closed leave the open descriptor count unchanged."""
        echo_port = listen_udp(self)
        harness = UdpHarness(self)
        yield turns()
        before = open_fds()
        for index in range(50):
            stream, recorder, association = yield harness.open()
            stream.send_datagram("127.0.0.1", echo_port, b"%d" % index)
            yield recorder.wait_for(1)
            stream.loseConnection()
            yield recorder.lost
            for _ in range(50):
                if association._closing:
                    break
                yield turns(0.005)
            yield association.wait_closed()
        self.assertEqual(open_fds(), before)
        self.assertEqual(harness.dialer.active, 0)
        self.assertEqual(harness.dialer.udp_stats.associations, 50)


# -- unit tests on a Clock --------------------------------------------------------

class FakeStream:
    """The transport side of an association: records closes and datagrams sent back."""

    def __init__(self):
        self.closed = 0
        self.sent = []

    def loseConnection(self):
        self.closed += 1

    def send_datagram(self, host, port, payload):
        self.sent.append((host, port, payload))
        return True


class FakeUdpPort:
    def __init__(self, protocol):
        self.protocol = protocol
        self.written = []
        self.stopped = False

    def write(self, payload, addr):
        self.written.append((addr, payload))

    def stopListening(self):
        self.stopped = True
        return defer.succeed(None)


class FakeUdpReactor:
    def __init__(self):
        self.ports = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.ports.append(FakeUdpPort(protocol))
        return self.ports[-1]


class AssociationUnitTests(SynchronousTestCase):
    """The association's timers and resolution queue, with a Clock and a fake reactor."""

    def make(self, idle_timeout=0, access=None, resolve_name=None):
        self.clock = task.Clock()
        self.reactor = FakeUdpReactor()
        self.resolutions = []

        def pending_resolve(host, port):
            d = defer.Deferred()
            self.resolutions.append((host, d))
            return d

        policy = access or AccessPolicy()  # one object, as the dialer's until a reload
        association = TargetAssociation(lambda: policy, self.reactor,
                                     resolve_name or pending_resolve,
                                     idle_timeout=idle_timeout, clock=self.clock)
        self.stream = FakeStream()
        association.makeConnection(self.stream)
        return association

    def test_idle_timeout_counts_both_directions(self):
        """Traffic either way postpones the idle close; silence then closes once."""
        association = self.make(idle_timeout=10)
        self.clock.advance(6)
        association.datagram_received("192.0.2.1", 53, b"q")
        self.clock.advance(6)
        association._target_datagram("192.0.2.1", 53, b"a")
        self.clock.advance(9)
        self.assertEqual(self.stream.closed, 0)
        self.clock.advance(1)
        self.assertEqual(self.stream.closed, 1)

    def test_unsolicited_does_not_keep_alive(self):
        """Datagrams from strangers neither pass nor postpone the idle close."""
        association = self.make(idle_timeout=10)
        self.clock.advance(5)
        association._target_datagram("198.51.100.9", 53, b"spam")
        self.clock.advance(5)
        self.assertEqual(self.stream.closed, 1)
        self.assertEqual(self.stream.sent, [])
        self.assertEqual(association.stats.dropped_unsolicited, 1)

    def test_reload_forgets_peers(self):
        """
        After a reload forbids a target, its datagrams reach the user no more
        (nor keep the association alive); a target still allowed goes on.
        """
        from anyproxy.access_policy import HostRule
        holder = [AccessPolicy()]
        association = TargetAssociation(lambda: holder[0], FakeUdpReactor(), None,
                                        clock=task.Clock())
        stream = FakeStream()
        association.makeConnection(stream)
        association.datagram_received("192.0.2.7", 53, b"q")
        association.datagram_received("198.51.100.1", 53, b"q")
        association._target_datagram("192.0.2.7", 53, b"before")
        self.assertEqual(len(stream.sent), 1)
        holder[0] = AccessPolicy(forbidden=[HostRule.parse("192.0.2.0/24")])
        association._target_datagram("192.0.2.7", 53, b"after")
        self.assertEqual(len(stream.sent), 1)
        # Still allowed: its replies go on flowing across the reload.
        association._target_datagram("198.51.100.1", 53, b"answer")
        self.assertEqual(len(stream.sent), 2)
        # A reload that forbids the port sent to drops that peer too.
        holder[0] = AccessPolicy(forbidden=[HostRule.parse("198.51.100.1:53")])
        association._target_datagram("198.51.100.1", 53, b"late")
        self.assertEqual(len(stream.sent), 2)

    def test_no_idle_timeout(self):
        """idle_timeout 0 never closes and schedules nothing."""
        self.make(idle_timeout=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_cleans_up(self):
        """Losing the connection stops the sockets, the timer and pending lookups."""
        association = self.make(idle_timeout=10)
        association.datagram_received("192.0.2.1", 53, b"q")
        association.datagram_received("name.test", 53, b"q")
        association.connectionLost(None)
        self.assertTrue(self.reactor.ports[0].stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.resolutions[0][1].called)
        self.successResultOf(association.wait_closed())

    def test_queue_while_resolving(self):
        """Datagrams wait for their name up to the bound; the rest are dropped."""
        association = self.make()
        for index in range(udp.MAX_PENDING_DATAGRAMS + 3):
            association.datagram_received("name.test", 53, b"%d" % index)
        self.assertEqual(len(self.resolutions), 1)
        self.assertEqual(association.stats.dropped_error, 3)
        self.resolutions[0][1].callback(["192.0.2.7"])
        written = self.reactor.ports[0].written
        self.assertEqual(len(written), udp.MAX_PENDING_DATAGRAMS)
        self.assertEqual(written[0], (("192.0.2.7", 53), b"0"))

    def test_cache_expires(self):
        """A cached answer is reused until its TTL, then the name is resolved again."""
        association = self.make()
        association.datagram_received("name.test", 53, b"1")
        self.resolutions[0][1].callback(["192.0.2.7"])
        association.datagram_received("name.test", 53, b"2")
        self.assertEqual(len(self.resolutions), 1)
        self.clock.advance(udp.CACHE_TTL)
        association.datagram_received("name.test", 53, b"3")
        self.assertEqual(len(self.resolutions), 2)

    def test_resolve_timeout(self):
        """A resolver that never answers gives up and drops the waiting datagrams."""
        association = self.make()
        association.datagram_received("slow.test", 53, b"1")
        self.clock.advance(udp.RESOLVE_TIMEOUT)
        self.assertEqual(association.stats.dropped_error, 1)
        self.assertEqual(association._pending_count, 0)

    def test_cache_bounded(self):
        """The name cache keeps at most MAX_CACHE_ENTRIES names."""
        association = self.make(resolve_name=lambda host, port: defer.succeed(["192.0.2.1"]))
        for index in range(udp.MAX_CACHE_ENTRIES + 10):
            association.datagram_received("n%d.test" % index, 53, b"x")
        self.assertEqual(len(association._cache), udp.MAX_CACHE_ENTRIES)

    def test_serves_udp(self):
        """serves_udp is False with allow_udp off or an allow-list without udp entries."""
        self.assertTrue(serves_udp(policy()))
        self.assertFalse(serves_udp(policy(allow_udp=False)))
        self.assertFalse(serves_udp(policy(allowed=[("10.0.0.1", "tcp")])))
        self.assertTrue(serves_udp(policy(allowed=[("10.0.0.1", "tcp"), ("10.0.0.2", "both")])))

    def test_stats_aggregate(self):
        """Counters add up on the association and on its parent."""
        parent = UdpStats()
        association = TargetAssociation(lambda: policy(forbidden=["192.0.2.0/24"]),
                                     FakeUdpReactor(), None, parent_stats=parent,
                                     clock=task.Clock())
        association.makeConnection(FakeStream())
        association.datagram_received("192.0.2.1", 53, b"q")
        association.datagram_received("198.51.100.1", 53, b"q")
        self.assertEqual((parent.dropped_acl, parent.sent, parent.associations), (1, 1, 1))
        self.assertEqual((association.stats.dropped_acl, association.stats.sent), (1, 1))
