# -*- test-case-name: tests.test_dialer -*-
"""
Tests for L{anyproxy.client.dialer}: failure mapping, resolution, and the
L{Dialer} answering OPEN requests, on a L{MemoryReactorClock} with a fake
resolver and fake streams.  One loopback test dials a real echo server through
a real L{Mux} pair.
"""

import errno
import socket

from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from anyproxy.access_policy import AccessPolicy, HostRule, LimitRule
from anyproxy.client import tcp_connect
from anyproxy.client.dialer import Dialer, NameLookups, resolve
from anyproxy.errors import reason_for_failure
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.splice import SpliceEnd
from anyproxy.tunnel.mux import Mux
from tests.support import Resolution
from tests.test_splice import HalfCloseTransport


# -- fakes ----------------------------------------------------------------------

@implementer(IHostnameResolver)
class FakeResolver:
    """
    Resolves names from a table and records every question.  With
    C{pending=True} answers wait until L{complete} is called.
    """

    def __init__(self, table=None, pending=False):
        self.table = table or {}
        self.pending = pending
        self.asked = []
        self.waiting = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append((hostName, portNumber))
        resolution = Resolution(hostName)
        receiver.resolutionBegan(resolution)
        if self.pending:
            self.waiting.append((receiver, hostName, portNumber))
        else:
            self._answer(receiver, hostName, portNumber)
        return resolution

    def complete(self):
        """Answer every question still waiting."""
        waiting, self.waiting = self.waiting, []
        for receiver, host, port in waiting:
            self._answer(receiver, host, port)

    def _answer(self, receiver, host, port):
        for ip in self.table.get(host, []):
            address_class = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(address_class("TCP", ip, port))
        receiver.resolutionComplete()


class FakeStream:
    """
    An incoming stream request as the mux hands it to the dialer: records
    accept/reject and the cancel hook.  C{accept} connects the protocol to a
    L{HalfCloseTransport}.
    """

    def __init__(self, host, port, kind="tcp", stream_id=1):
        self.kind = kind
        self.host = host
        self.port = port
        self.stream_id = stream_id
        self.closed = False
        self.accepted = []
        self.rejected = []
        self.resets = []
        self.cancel_hook = None
        self.transport = None

    def accept(self, protocol, dialed=None):
        self.accepted.append(protocol)
        self.dialed = dialed
        self.transport = HalfCloseTransport()
        protocol.makeConnection(self.transport)

    def reject(self, reason, text=""):
        self.rejected.append(reason)
        self.closed = True

    def reset(self, reason):
        self.resets.append(reason)
        self.closed = True

    def set_cancel_hook(self, hook):
        self.cancel_hook = hook

    def opener_gives_up(self):
        """The gateway cancels the open before an answer (as a RESET does)."""
        self.closed = True
        hook, self.cancel_hook = self.cancel_hook, None
        hook()


def policy(forbidden=(), allowed=(), allow_udp=True, allowed_hosts=()):
    """An L{AccessPolicy} from rule texts and C{(addr, protocol)} pairs (C{limit})."""
    return AccessPolicy(forbidden=[HostRule.parse(text) for text in forbidden],
                        allowed=[LimitRule.parse(addr, protocol) for addr, protocol in allowed],
                        allow_udp=allow_udp,
                        allowed_hosts=[HostRule.parse(text) for text in allowed_hosts])


def fail(exception):
    return failure.Failure(exception)


# -- tests ----------------------------------------------------------------------

class ReasonForFailureTests(SynchronousTestCase):
    """reason_for_failure maps each connect/resolve failure to its L{Reason}."""

    def check(self, exception, reason):
        self.assertIs(reason_for_failure(fail(exception)), reason)

    def test_refused(self):
        """A refused connection is CONNECTION_REFUSED."""
        self.check(error.ConnectionRefusedError(), Reason.CONNECTION_REFUSED)
        self.check(error.getConnectError((errno.ECONNREFUSED, "refused")),
                   Reason.CONNECTION_REFUSED)

    def test_user_timeout(self):
        """The connector's own timeout (error.TimeoutError) is TIMED_OUT."""
        self.check(error.TimeoutError(), Reason.TIMED_OUT)

    def test_tcp_timeout(self):
        """A TCP timeout (ETIMEDOUT) is TIMED_OUT."""
        self.check(error.TCPTimedOutError(), Reason.TIMED_OUT)
        self.check(error.getConnectError((errno.ETIMEDOUT, "timed out")), Reason.TIMED_OUT)

    def test_deferred_timeout(self):
        """A Deferred timeout (addTimeout) is TIMED_OUT."""
        self.check(defer.TimeoutError(), Reason.TIMED_OUT)

    def test_dns(self):
        """A DNS lookup failure is NAME_NOT_RESOLVED."""
        self.check(error.DNSLookupError("nowhere.test"), Reason.NAME_NOT_RESOLVED)

    def test_no_route(self):
        """A NoRouteError without an errno is HOST_UNREACHABLE."""
        self.check(error.NoRouteError(), Reason.HOST_UNREACHABLE)

    def test_network_unreachable(self):
        """ENETUNREACH is NETWORK_UNREACHABLE, also as the NoRouteError Twisted raises for it."""
        self.check(error.ConnectError(osError=errno.ENETUNREACH), Reason.NETWORK_UNREACHABLE)
        self.check(error.getConnectError((errno.ENETUNREACH, "network is unreachable")),
                   Reason.NETWORK_UNREACHABLE)

    def test_host_unreachable(self):
        """EHOSTUNREACH and EHOSTDOWN are HOST_UNREACHABLE."""
        self.check(error.ConnectError(osError=errno.EHOSTUNREACH), Reason.HOST_UNREACHABLE)
        self.check(error.getConnectError((errno.EHOSTUNREACH, "no route to host")),
                   Reason.HOST_UNREACHABLE)
        self.check(error.ConnectError(osError=errno.EHOSTDOWN), Reason.HOST_UNREACHABLE)

    def test_stream_open_error(self):
        """A StreamOpenError keeps its own reason."""
        for reason in Reason:
            self.check(StreamOpenError(reason), reason)

    def test_anything_else(self):
        """Any other failure is GENERAL_FAILURE."""
        self.check(error.ConnectError(), Reason.GENERAL_FAILURE)
        self.check(error.ConnectError(osError=errno.EACCES), Reason.GENERAL_FAILURE)
        self.check(ValueError("boom"), Reason.GENERAL_FAILURE)
        self.check(error.ConnectionLost(), Reason.GENERAL_FAILURE)


class NameLookupsTests(SynchronousTestCase):
    """
    Lookups are counted until the resolver ends them, not until we stop
    waiting: names that never answer cannot queue without end.
    """

    def test_bound_counts_until_the_resolver_ends(self):
        """A timed-out (cancelled) lookup keeps its place until the resolver answers."""
        resolver = FakeResolver({"a.test": ["192.0.2.1"]}, pending=True)
        lookups = NameLookups(resolver, limit=2)
        first = lookups.resolve("slow-1.test", 80)
        second = lookups.resolve("slow-2.test", 80)
        first.cancel()  # our timeout
        second.cancel()
        self.failureResultOf(first)
        self.failureResultOf(second)
        refused = lookups.resolve("a.test", 80)
        self.assertEqual(self.failureResultOf(refused, StreamOpenError).value.reason,
                         Reason.OVERLOADED)
        self.assertEqual((lookups.running, lookups.refused), (2, 1))
        resolver.complete()  # the resolver ends them (no answer)
        self.assertEqual(lookups.running, 0)
        d = lookups.resolve("a.test", 80)
        resolver.complete()
        self.assertEqual(self.successResultOf(d), ["192.0.2.1"])
        self.assertEqual(lookups.running, 0)

    def test_per_owner(self):
        """One owner (a UDP association) has at most per_owner lookups; others are not held up."""
        resolver = FakeResolver(pending=True)
        lookups = NameLookups(resolver, limit=10, per_owner=2)
        owner = object()
        waiting = [lookups.resolve("n%d.test" % (number,), 53, owner=owner) for number in range(2)]
        self.failureResultOf(lookups.resolve("n9.test", 53, owner=owner), StreamOpenError)
        waiting.append(lookups.resolve("other.test", 53, owner=object()))
        waiting.append(lookups.resolve("tcp.test", 80))
        # All associations together: owned_limit.
        lookups.owned_limit = 3
        self.failureResultOf(lookups.resolve("third.test", 53, owner=object()), StreamOpenError)
        waiting.append(lookups.resolve("tcp-2.test", 80))  # a stream's is not held up
        for d in waiting:
            self.assertNoResult(d)
        resolver.complete()
        for d in waiting:  # none of them resolves in this table
            self.failureResultOf(d, StreamOpenError)
        self.assertEqual((lookups.running, lookups.owned, lookups._owners), (0, 0, {}))

    def test_literals_and_bad_names_hold_no_place(self):
        """An IP literal is no lookup; a name refused before the resolver frees its place."""
        lookups = NameLookups(FakeResolver(), limit=1)
        self.assertEqual(self.successResultOf(lookups.resolve("192.0.2.7", 80)), ["192.0.2.7"])
        self.failureResultOf(lookups.resolve("a b.test", 80), StreamOpenError)
        self.assertEqual(lookups.running, 0)


class ResolveTests(SynchronousTestCase):
    """resolve() turns a host into the list of addresses to check and dial."""

    def test_ipv4_literal(self):
        """An IPv4 literal is returned as is, without asking the resolver."""
        resolver = FakeResolver()
        self.assertEqual(self.successResultOf(resolve(resolver, "192.0.2.1", 80)), ["192.0.2.1"])
        self.assertEqual(resolver.asked, [])

    def test_ipv6_literal(self):
        """An IPv6 literal is returned (in canonical form) without asking the resolver."""
        resolver = FakeResolver()
        self.assertEqual(self.successResultOf(resolve(resolver, "2001:db8::1", 80)),
                         ["2001:db8::1"])
        self.assertEqual(self.successResultOf(resolve(resolver, "2001:0db8:0::0001", 80)),
                         ["2001:db8::1"])
        self.assertEqual(resolver.asked, [])

    def test_bracketed_ipv6_literal(self):
        """A bracketed IPv6 literal loses its brackets and is not looked up."""
        resolver = FakeResolver()
        self.assertEqual(self.successResultOf(resolve(resolver, "[::1]", 22)), ["::1"])
        self.assertEqual(resolver.asked, [])

    def test_name(self):
        """A name is looked up with its port and every address is collected, in order."""
        resolver = FakeResolver({"multi.test": ["192.0.2.1", "2001:db8::5", "192.0.2.2"]})
        self.assertEqual(self.successResultOf(resolve(resolver, "multi.test", 443)),
                         ["192.0.2.1", "2001:db8::5", "192.0.2.2"])
        self.assertEqual(resolver.asked, [("multi.test", 443)])

    def test_duplicates(self):
        """An address reported twice is listed once."""
        resolver = FakeResolver({"dup.test": ["192.0.2.1", "192.0.2.1", "192.0.2.3"]})
        self.assertEqual(self.successResultOf(resolve(resolver, "dup.test", 80)),
                         ["192.0.2.1", "192.0.2.3"])

    def test_waits_for_completion(self):
        """The result waits for the resolution to complete."""
        resolver = FakeResolver({"slow.test": ["192.0.2.9"]}, pending=True)
        d = resolve(resolver, "slow.test", 80)
        self.assertNoResult(d)
        resolver.complete()
        self.assertEqual(self.successResultOf(d), ["192.0.2.9"])

    def test_not_a_host_name(self):
        """A name IDNA cannot encode, or with characters no host name has, fails NAME_NOT_RESOLVED at once."""
        resolver = FakeResolver()
        for name in ("a..b", "x" * 64 + ".example", ".leading",
                     # Not names either, though a hosts file could answer them:
                     # the policy must judge the very text that is dialed.
                     "10.0.0.5%x", " 10.0.0.5", "10.0.0.5\t", "a.trusted.example:443",
                     "a b.example", "a/b.example", "",
                     # IPv4 addresses in short forms, which getaddrinfo would
                     # dial with no DNS and no address rule seeing them.
                     "127.1", "2130706433", "0x7f.1", "10.0.0.1.", "example.0x1f"):
            d = resolve(resolver, name, 80)
            self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason,
                             Reason.NAME_NOT_RESOLVED, name)
        self.assertEqual(resolver.asked, [])

    def test_no_addresses(self):
        """A name with no addresses fails NAME_NOT_RESOLVED."""
        d = resolve(FakeResolver(), "nowhere.test", 80)
        self.assertEqual(self.failureResultOf(d, StreamOpenError).value.reason,
                         Reason.NAME_NOT_RESOLVED)


class DialerTestMixin:
    """Builds a dialer on a L{MemoryReactorClock} and drives its connection attempts."""

    def dialer(self, table=None, pending=False, **kwargs):
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(table if table is not None else
                                     {"target.test": ["192.0.2.10"]}, pending=pending)
        kwargs.setdefault("policy", AccessPolicy())
        kwargs.setdefault("connect_tcp", self.reactor.connectTCP)
        return Dialer(reactor=self.reactor, resolver=self.resolver, **kwargs)

    def dialed(self):
        """The C{(host, port)} of every connectTCP call so far."""
        return [(host, port) for host, port, _, _, _ in self.reactor.tcpClients]

    def succeed_connect(self, index=0):
        """Complete connection attempt C{index}; returns the target's transport."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return transport

    def stopping_fails_at_once(self, index=0):
        """Make attempt C{index}'s connector fail it at once when stopped, as Twisted's does."""
        factory, connector = self.reactor.tcpClients[index][2], self.reactor.connectors[index]
        connector.stopConnecting = lambda: factory.clientConnectionFailed(
            connector, fail(error.UserError()))

    def fail_connect(self, exception, index=0):
        """Fail connection attempt C{index} with C{exception}."""
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], fail(exception))


class RefusalTests(DialerTestMixin, SynchronousTestCase):
    """Requests the dialer refuses before or after resolving, without connecting."""

    def test_udp(self):
        """With allow_udp off, a UDP stream is rejected PROTOCOL_NOT_ALLOWED."""
        dialer = self.dialer(policy=policy(allow_udp=False))
        stream = FakeStream("target.test", 53, kind="udp")
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.PROTOCOL_NOT_ALLOWED])
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(dialer.active, 0)

    def test_overloaded(self):
        """With max_streams dials in progress and no queue, the next is rejected OVERLOADED."""
        dialer = self.dialer(pending=True, max_streams=2, queue_size=0)
        first, second, third = (FakeStream("target.test", 80, stream_id=i) for i in (1, 3, 5))
        dialer.handle_open(first)
        dialer.handle_open(second)
        dialer.handle_open(third)
        self.assertEqual((first.rejected, second.rejected), ([], []))
        self.assertEqual(third.rejected, [Reason.OVERLOADED])
        self.assertEqual(dialer.active, 2)
        self.assertEqual(len(self.resolver.asked), 2)

    def test_overloaded_after_queue_timeout(self):
        """Beyond max_streams an OPEN waits; after queue_timeout it is rejected OVERLOADED."""
        dialer = self.dialer(pending=True, max_streams=2, queue_timeout=3.0)
        streams = [FakeStream("target.test", 80, stream_id=i) for i in (1, 3, 5)]
        for stream in streams:
            dialer.handle_open(stream)
        self.assertEqual([s.rejected for s in streams], [[], [], []])
        self.assertEqual(len(self.resolver.asked), 2)
        self.reactor.advance(2.9)
        self.assertEqual(streams[2].rejected, [])
        self.reactor.advance(0.1)
        self.assertEqual(streams[2].rejected, [Reason.OVERLOADED])
        self.assertEqual(dialer.active, 2)
        self.assertEqual(len(self.resolver.asked), 2)

    def test_queued_open_proceeds(self):
        """A waiting OPEN is dialled as soon as an earlier stream frees its slot."""
        dialer = self.dialer(max_streams=1)
        first, second = FakeStream("target.test", 80), FakeStream("target.test", 81, stream_id=3)
        dialer.handle_open(first)
        dialer.handle_open(second)
        self.assertEqual(self.dialed(), [("192.0.2.10", 80)])
        self.fail_connect(error.ConnectionRefusedError())
        self.assertEqual(first.rejected, [Reason.CONNECTION_REFUSED])
        self.assertEqual(self.dialed(), [("192.0.2.10", 80), ("192.0.2.10", 81)])
        self.assertEqual(second.rejected, [])
        self.assertEqual(dialer.active, 1)

    def test_queued_open_cancelled(self):
        """The gateway giving up on a waiting OPEN takes it out of the queue."""
        dialer = self.dialer(pending=True, max_streams=1)
        first, second = FakeStream("target.test", 80), FakeStream("target.test", 81, stream_id=3)
        dialer.handle_open(first)
        dialer.handle_open(second)
        self.assertEqual(dialer.slots.waiting(), 1)
        second.opener_gives_up()
        self.assertEqual(dialer.slots.waiting(), 0)
        self.assertEqual(second.rejected, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_not_overloaded_after_failure(self):
        """A failed dial frees its slot for the next stream."""
        dialer = self.dialer(max_streams=1)
        first = FakeStream("nowhere.test", 80)
        dialer.handle_open(first)
        self.assertEqual(first.rejected, [Reason.NAME_NOT_RESOLVED])
        second = FakeStream("target.test", 80)
        dialer.handle_open(second)
        self.assertEqual(second.rejected, [])
        self.assertEqual(self.dialed(), [("192.0.2.10", 80)])

    def test_forbidden_name(self):
        """A forbidden name is rejected NOT_ALLOWED without being resolved."""
        dialer = self.dialer(policy=policy(forbidden=["*.internal.test"]))
        stream = FakeStream("db.internal.test", 5432)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.dialed(), [])
        self.assertEqual(dialer.active, 0)

    def test_forbidden_literal(self):
        """A forbidden literal address is rejected NOT_ALLOWED and never dialled."""
        dialer = self.dialer(policy=policy(forbidden=["10.0.0.0/8", "::1"]))
        for host in ("10.1.2.3", "[::1]", "::ffff:10.0.0.1"):
            stream = FakeStream(host, 22)
            dialer.handle_open(stream)
            self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])
        self.assertEqual(self.dialed(), [])
        self.assertEqual(dialer.active, 0)

    def test_resolves_to_forbidden(self):
        """A name resolving to a forbidden address is rejected NOT_ALLOWED and never dialled."""
        dialer = self.dialer({"rebind.test": ["169.254.169.254"]},
                             policy=policy(forbidden=["169.254.0.0/16"]))
        stream = FakeStream("rebind.test", 80)
        dialer.handle_open(stream)
        self.assertEqual(self.resolver.asked, [("rebind.test", 80)])
        self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])
        self.assertEqual(self.dialed(), [])
        self.assertEqual(dialer.active, 0)

    def test_allowed_hosts_names_only(self):
        """allowed_hosts of names only: another name is refused without a DNS query."""
        dialer = self.dialer(policy=policy(allowed_hosts=["*.example.test:443", "api.test:*"]))
        stream = FakeStream("target.test", 443)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.dialed(), [])
        self.assertEqual(dialer.active, 0)

    def test_allowed_hosts_admits_then_checks_addresses(self):
        """A name allowed_hosts admits is still refused if it resolves to a forbidden address."""
        dialer = self.dialer({"a.example.test": ["192.0.2.7"], "b.example.test": ["10.0.0.5"]},
                             policy=policy(forbidden=[r"10\..*"],
                                           allowed_hosts=[r".*\.example\.test:443"]))
        allowed, rebound = FakeStream("a.example.test", 443), FakeStream("b.example.test", 443,
                                                                         stream_id=3)
        dialer.handle_open(allowed)
        dialer.handle_open(rebound)
        self.assertEqual((allowed.rejected, rebound.rejected), ([], [Reason.NOT_ALLOWED]))
        self.assertEqual(self.dialed(), [("192.0.2.7", 443)])

    def test_one_forbidden_address_is_enough(self):
        """A name with one forbidden address among good ones is refused outright."""
        dialer = self.dialer({"mixed.test": ["192.0.2.1", "10.0.0.5"]},
                             policy=policy(forbidden=["10.0.0.0/8"]))
        stream = FakeStream("mixed.test", 80)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])
        self.assertEqual(self.dialed(), [])

    def test_allow_list(self):
        """With an allow-list, only listed targets are dialled."""
        rules = policy(allowed=[("allowed.test:443", "tcp"), ("192.0.2.0/24", "both")])
        dialer = self.dialer({"allowed.test": ["198.51.100.1"], "other.test": ["198.51.100.2"],
                              "inside.test": ["192.0.2.50"]}, policy=rules)
        outcomes = {}
        for host, port in [("allowed.test", 443), ("allowed.test", 80), ("other.test", 443),
                           ("inside.test", 8080), ("192.0.2.7", 22), ("203.0.113.1", 443)]:
            stream = FakeStream(host, port)
            dialer.handle_open(stream)
            outcomes[host, port] = stream.rejected
        self.assertEqual(outcomes, {
            ("allowed.test", 443): [],
            ("allowed.test", 80): [Reason.NOT_ALLOWED],
            ("other.test", 443): [Reason.NOT_ALLOWED],
            ("inside.test", 8080): [],
            ("192.0.2.7", 22): [],
            ("203.0.113.1", 443): [Reason.NOT_ALLOWED],
        })
        self.assertEqual(self.dialed(), [("198.51.100.1", 443), ("192.0.2.50", 8080),
                                         ("192.0.2.7", 22)])

    def test_allow_list_udp_only(self):
        """A target listed for UDP only is rejected PROTOCOL_NOT_ALLOWED for TCP."""
        dialer = self.dialer({"dns.test": ["192.0.2.53"]},
                             policy=policy(allowed=[("dns.test", "udp")]))
        stream = FakeStream("dns.test", 53)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.PROTOCOL_NOT_ALLOWED])
        self.assertEqual(self.dialed(), [])


class CountingPolicy:
    """An access policy that allows everything and counts its checks."""

    def __init__(self):
        self.checks = []

    def check_name(self, host, port, protocol):
        self.checks.append(("name", host, port))
        return None

    def check_resolved(self, host, port, protocol, addresses):
        self.checks.append(("resolved", host, port, tuple(addresses)))
        return None


class DecisionTests(DialerTestMixin, SynchronousTestCase):
    """Access control decisions are kept per policy, never past a change of policy."""

    def test_repeated_target_checked_once(self):
        """A second stream to the same target uses the decisions of the first."""
        counting = CountingPolicy()
        dialer = self.dialer(policy=counting)
        for stream_id in (1, 3):
            dialer.handle_open(FakeStream("192.0.2.9", 443, stream_id=stream_id))
            dialer.handle_open(FakeStream("target.test", 80, stream_id=stream_id + 4))
        self.assertEqual(counting.checks, [
            ("name", "192.0.2.9", 443), ("resolved", "192.0.2.9", 443, ("192.0.2.9",)),
            ("name", "target.test", 80), ("resolved", "target.test", 80, ("192.0.2.10",))])
        self.assertEqual(len(self.dialed()), 4)

    def test_new_addresses_checked(self):
        """A name that resolves to other addresses than before is checked again."""
        counting = CountingPolicy()
        dialer = self.dialer(policy=counting)
        dialer.handle_open(FakeStream("target.test", 80))
        self.resolver.table["target.test"] = ["192.0.2.11"]
        dialer.handle_open(FakeStream("target.test", 80, stream_id=3))
        self.assertIn(("resolved", "target.test", 80, ("192.0.2.11",)), counting.checks)

    def test_reload_forbids_cached_target(self):
        """After set_policy, a target allowed before is refused by the new policy."""
        dialer = self.dialer()
        dialer.handle_open(FakeStream("192.0.2.9", 443))
        dialer.handle_open(FakeStream("target.test", 80, stream_id=3))
        dialer.set_policy(policy(forbidden=["192.0.2.9", "192.0.2.10"]))
        literal, named = FakeStream("192.0.2.9", 443, stream_id=5), FakeStream("target.test", 80,
                                                                               stream_id=7)
        dialer.handle_open(literal)
        dialer.handle_open(named)
        self.assertEqual((literal.rejected, named.rejected), ([Reason.NOT_ALLOWED], [Reason.NOT_ALLOWED]))
        self.assertEqual(len(self.dialed()), 2)

    def test_policy_replaced_directly(self):
        """Decisions belong to the policy object: assigning a new one drops them too."""
        dialer = self.dialer()
        dialer.handle_open(FakeStream("192.0.2.9", 443))
        dialer.policy = policy(forbidden=["192.0.2.9"])
        stream = FakeStream("192.0.2.9", 443, stream_id=3)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.NOT_ALLOWED])


class DialTests(DialerTestMixin, SynchronousTestCase):
    """Resolving, dialling the checked addresses, and splicing the stream to the target."""

    def test_dials_resolved_address(self):
        """The dialer connects to the resolved address and requested port, with its timeout."""
        dialer = self.dialer(connect_timeout=7.0)
        dialer.handle_open(FakeStream("target.test", 8443))
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.10", 8443))
        self.assertEqual(self.reactor.tcpClients[0][3], 7.0)
        self.assertEqual(dialer.active, 1)

    def test_dials_literal(self):
        """A literal IPv6 address is dialled as is, without resolving."""
        dialer = self.dialer()
        dialer.handle_open(FakeStream("[2001:db8::7]", 22))
        self.assertEqual(self.dialed(), [("2001:db8::7", 22)])
        self.assertEqual(self.resolver.asked, [])

    def test_connected(self):
        """On connect the stream is accepted with a splice end joined to the target."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        self.assertEqual(stream.accepted, [])
        target = self.succeed_connect()
        self.assertEqual(len(stream.accepted), 1)
        end = stream.accepted[0]
        self.assertIsInstance(end, SpliceEnd)
        self.assertIs(stream.transport.producer, target)
        self.assertIs(target.producer, stream.transport)
        end.dataReceived(b"request")
        end.other.dataReceived(b"response")
        self.assertEqual(target.value(), b"request")
        self.assertEqual(stream.transport.value(), b"response")
        self.assertEqual(stream.rejected, [])
        self.assertEqual(dialer.active, 1)

    def test_reload_revokes_open_streams(self):
        """A new policy resets the open streams it forbids, by name or by address, only those."""
        dialer = self.dialer({"target.test": ["192.0.2.10"], "other.test": ["192.0.2.20"]})
        streams = [FakeStream("target.test", 80, stream_id=1), FakeStream("other.test", 80, stream_id=3),
                   FakeStream("192.0.2.30", 80, stream_id=5)]
        for index, stream in enumerate(streams):
            dialer.handle_open(stream)
            self.succeed_connect(index)
        dialer.set_policy(policy(forbidden=["target.test", "192.0.2.30"]))
        self.assertEqual([s.resets for s in streams],
                         [[Reason.NOT_ALLOWED], [], [Reason.NOT_ALLOWED]])
        self.assertEqual(dialer.acl_refusals, 2)
        dialer.set_policy(policy(forbidden=["192.0.2.20"]))  # by the address it reached
        self.assertEqual(streams[1].resets, [Reason.NOT_ALLOWED])

    def test_reload_while_connecting(self):
        """A connect that completes after a reload forbade its target is refused, not spliced."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        dialer.set_policy(policy(forbidden=["192.0.2.0/24"]))
        target = self.succeed_connect()
        self.assertEqual((stream.accepted, stream.rejected), ([], [Reason.NOT_ALLOWED]))
        self.assertTrue(target.disconnecting)
        self.assertEqual(dialer.active, 0)

    def test_connect_raising_at_once(self):
        """
        The connect raising (an IPv6 zone naming no interface: it is looked
        up in the call) refuses the stream HOST_UNREACHABLE and frees its
        slot.
        """
        dialer = self.dialer(connect_tcp=lambda *args, **kwargs: tcp_connect.connect_tcp(
            self.reactor, *args, **kwargs))
        stream = FakeStream("fe80::1%zzz", 22)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.HOST_UNREACHABLE])
        self.assertEqual(dialer.active, 0)

    def test_many_addresses_failing_at_once(self):
        """
        A name with hundreds of addresses, each failing in the connect call
        (unreachable from here): each is tried in turn, without recursing,
        and the stream is refused NETWORK_UNREACHABLE.
        """
        class Unreachable(socket.socket):
            def connect_ex(self, address):
                return errno.ENETUNREACH

        self.patch(socket, "socket", Unreachable)
        addresses = ["2001:db8::%x" % (n,) for n in range(1, 1001)]
        dialer = self.dialer({"many.test": addresses},
                             connect_tcp=lambda *args, **kwargs: tcp_connect.connect_tcp(
                                 self.reactor, *args, **kwargs))
        stream = FakeStream("many.test", 443)
        dialer.handle_open(stream)
        self.reactor.advance(0)
        self.assertEqual(stream.rejected, [Reason.NETWORK_UNREACHABLE])
        self.assertEqual(dialer.active, 0)

    def test_cancel_tries_no_next_address(self):
        """The gateway giving up while the first address is dialled: no other address is tried."""
        dialer = self.dialer({"multi.test": ["192.0.2.1", "192.0.2.2"]})
        stream = FakeStream("multi.test", 80)
        dialer.handle_open(stream)
        self.stopping_fails_at_once()
        stream.opener_gives_up()
        self.assertEqual(self.dialed(), [("192.0.2.1", 80)])
        self.assertEqual(dialer.active, 0)

    def test_timeout_tries_no_next_address(self):
        """connect_timeout bounds the whole dial, not each address."""
        dialer = self.dialer({"multi.test": ["192.0.2.1", "192.0.2.2"]}, connect_timeout=5.0)
        stream = FakeStream("multi.test", 80)
        dialer.handle_open(stream)
        self.stopping_fails_at_once()
        self.reactor.advance(5.0)
        self.assertEqual(self.dialed(), [("192.0.2.1", 80)])
        self.assertEqual(stream.rejected, [Reason.TIMED_OUT])
        self.assertEqual(dialer.active, 0)

    def test_next_address(self):
        """When the first address refuses, the next one is tried."""
        dialer = self.dialer({"two.test": ["192.0.2.1", "192.0.2.2"]})
        stream = FakeStream("two.test", 80)
        dialer.handle_open(stream)
        self.fail_connect(error.ConnectionRefusedError())
        self.assertEqual(self.dialed(), [("192.0.2.1", 80), ("192.0.2.2", 80)])
        self.succeed_connect(1)
        self.assertEqual(len(stream.accepted), 1)
        self.assertEqual(stream.rejected, [])

    def test_last_failure_wins(self):
        """When every address fails, the stream is rejected with the last failure's reason."""
        dialer = self.dialer({"two.test": ["192.0.2.1", "192.0.2.2"]})
        stream = FakeStream("two.test", 80)
        dialer.handle_open(stream)
        self.fail_connect(error.getConnectError((errno.EHOSTUNREACH, "no route")))
        self.fail_connect(error.ConnectionRefusedError(), index=1)
        self.assertEqual(stream.rejected, [Reason.CONNECTION_REFUSED])
        self.assertEqual(dialer.active, 0)

    def test_refused(self):
        """A refused connection rejects the stream CONNECTION_REFUSED."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        self.fail_connect(error.ConnectionRefusedError())
        self.assertEqual(stream.rejected, [Reason.CONNECTION_REFUSED])
        self.assertEqual(dialer.active, 0)

    def test_not_resolved(self):
        """A name without addresses rejects the stream NAME_NOT_RESOLVED."""
        dialer = self.dialer()
        stream = FakeStream("nowhere.test", 80)
        dialer.handle_open(stream)
        self.assertEqual(stream.rejected, [Reason.NAME_NOT_RESOLVED])
        self.assertEqual(dialer.active, 0)

    def test_connect_timeout(self):
        """A target that never answers: TIMED_OUT after connect_timeout."""
        dialer = self.dialer(connect_timeout=5.0)
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        self.reactor.advance(4.9)
        self.assertEqual(stream.rejected, [])
        self.reactor.advance(0.1)
        self.assertEqual(stream.rejected, [Reason.TIMED_OUT])
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(dialer.active, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_literal_connect_timeout(self):
        """A literal target that never answers: TIMED_OUT after connect_timeout, nothing left."""
        dialer = self.dialer(connect_timeout=5.0)
        stream = FakeStream("192.0.2.44", 80)
        dialer.handle_open(stream)
        self.assertEqual(self.dialed(), [("192.0.2.44", 80)])
        self.reactor.advance(5)
        self.assertEqual(stream.rejected, [Reason.TIMED_OUT])
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(dialer.active, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_literal_connected(self):
        """A literal target is spliced once connected, as a resolved one is."""
        dialer = self.dialer()
        stream = FakeStream("192.0.2.44", 80)
        dialer.handle_open(stream)
        self.succeed_connect()
        self.assertEqual(len(stream.accepted), 1)
        dialer.stop()  # the idle sweep: what is left is the connect's timeout, if any
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connect_timeout_tries_no_other_address(self):
        """After the timeout no further address is dialled."""
        dialer = self.dialer({"two.test": ["192.0.2.1", "192.0.2.2"]}, connect_timeout=5.0)
        stream = FakeStream("two.test", 80)
        dialer.handle_open(stream)
        self.reactor.advance(5)
        self.assertEqual(self.dialed(), [("192.0.2.1", 80)])
        self.assertEqual(stream.rejected, [Reason.TIMED_OUT])
        self.assertEqual(dialer.active, 0)

    def test_resolve_timeout(self):
        """A resolution slower than connect_timeout: TIMED_OUT, and a late answer dials nothing."""
        dialer = self.dialer(pending=True, connect_timeout=5.0)
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        self.reactor.advance(5)
        self.assertEqual(stream.rejected, [Reason.TIMED_OUT])
        self.resolver.complete()
        self.assertEqual(self.dialed(), [])
        self.assertEqual(dialer.active, 0)

    def test_cancel_pending_dial(self):
        """The cancel hook stops a connection attempt in progress and frees the slot."""
        dialer = self.dialer({"two.test": ["192.0.2.1", "192.0.2.2"]})
        stream = FakeStream("two.test", 80)
        dialer.handle_open(stream)
        stream.opener_gives_up()
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.dialed(), [("192.0.2.1", 80)])
        self.assertEqual(stream.accepted, [])
        self.assertEqual(dialer.active, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_during_resolution(self):
        """The cancel hook during resolution frees the slot and a late answer dials nothing."""
        dialer = self.dialer(pending=True)
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        stream.opener_gives_up()
        self.assertEqual(dialer.active, 0)
        self.resolver.complete()
        self.assertEqual(self.dialed(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stream_closed_before_connect(self):
        """A target connected after the stream closed is dropped, not accepted."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        stream.closed = True  # closed without the hook (e.g. the tunnel went away)
        target = self.succeed_connect()
        self.assertEqual(stream.accepted, [])
        self.assertIn("loseConnection", target.calls)
        self.assertEqual(dialer.active, 0)


class ActiveCountTests(DialerTestMixin, SynchronousTestCase):
    """The active counter returns to 0 once streams are finished."""

    def test_after_failures(self):
        """Every kind of failure gives its slot back."""
        dialer = self.dialer({"target.test": ["192.0.2.10"], "bad.test": ["10.0.0.1"]},
                             policy=policy(forbidden=["forbidden.test", "10.0.0.0/8"],
                                           allow_udp=False))
        for host in ("forbidden.test", "bad.test", "nowhere.test"):
            dialer.handle_open(FakeStream(host, 80))
        dialer.handle_open(FakeStream("target.test", 80, kind="udp"))
        dialer.handle_open(FakeStream("target.test", 80))
        self.fail_connect(error.ConnectionRefusedError())
        self.assertEqual(dialer.active, 0)

    def test_after_close(self):
        """A connected stream holds its slot until its connection is lost."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        target = self.succeed_connect()
        self.assertEqual(dialer.active, 1)
        end = stream.accepted[0]
        end.other.connectionLost(fail(error.ConnectionDone()))
        self.assertIn("loseConnection", stream.transport.calls)
        self.assertEqual(dialer.active, 1)
        end.connectionLost(fail(error.ConnectionDone()))
        self.assertEqual(dialer.active, 0)
        self.assertEqual(target.calls, [])

    def test_after_close_from_stream_side(self):
        """A stream lost from the tunnel side closes the target and gives the slot back once."""
        dialer = self.dialer()
        stream = FakeStream("target.test", 80)
        dialer.handle_open(stream)
        target = self.succeed_connect()
        end = stream.accepted[0]
        end.connectionLost(fail(error.ConnectionLost()))
        self.assertIn("loseConnection", target.calls)
        end.connectionLost(fail(error.ConnectionLost()))
        end.other.connectionLost(fail(error.ConnectionDone()))
        self.assertEqual(dialer.active, 0)

    def test_many(self):
        """Several streams opened and closed leave the counter at 0."""
        dialer = self.dialer()
        streams = [FakeStream("target.test", 80, stream_id=2 * i + 1) for i in range(5)]
        for stream in streams:
            dialer.handle_open(stream)
        self.assertEqual(dialer.active, 5)
        for index, stream in enumerate(streams):
            self.succeed_connect(index)
        for stream in streams:
            stream.accepted[0].connectionLost(fail(error.ConnectionDone()))
        self.assertEqual(dialer.active, 0)


# -- loopback -------------------------------------------------------------------

@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes bytes; on EOF closes after its echo is sent, and fires C{factory.lost}."""

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.factory.lost.callback(None)


class EchoFactory(Factory):
    protocol = Echo

    def __init__(self):
        self.lost = defer.Deferred()


class Collector(Protocol):
    """Collects bytes; fires C{done} with them when the connection is lost."""

    def __init__(self):
        self.chunks = []
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


class LoopbackMuxPair:
    """A gateway and a client mux whose messages are delivered by the reactor, in order."""

    def __init__(self, on_open_request):
        self.calls = []
        self.gateway = Mux(lambda message: self._later(self.client, message), initiator=False)
        self.client = Mux(lambda message: self._later(self.gateway, message), initiator=True,
                          on_open_request=on_open_request)

    def _later(self, mux, message):
        self.calls = [call for call in self.calls if call.active()]
        self.calls.append(reactor.callLater(0, mux.message_received, message))

    def cancel_pending(self):
        for call in self.calls:
            if call.active():
                call.cancel()


class LoopbackTests(TestCase):
    """A real dial to an echo server on 127.0.0.1 through a real mux stream."""

    timeout = 10

    @defer.inlineCallbacks
    def test_echo(self):
        """Bytes written on the gateway side come back from the echo server, and all closes."""
        echo = EchoFactory()
        port = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        resolver = FakeResolver()
        dialer = Dialer(AccessPolicy(), reactor, connect_timeout=5, resolver=resolver)
        requests = []

        def on_open_request(stream):
            requests.append(stream)
            dialer.handle_open(stream)

        pair = LoopbackMuxPair(on_open_request)
        self.addCleanup(pair.cancel_pending)
        stream = yield pair.gateway.open_stream("tcp", "127.0.0.1", port.getHost().port)
        target = requests[0].protocol.other
        target_lost = defer.Deferred()
        target.on_close = lambda end, reason: target_lost.callback(None)
        collector = Collector()
        stream.attach(collector)
        payload = b"hello through the tunnel " * 1000
        stream.write(payload)
        stream.loseWriteConnection()  # the echo server closes once it has seen EOF
        echoed = yield collector.done
        yield echo.lost
        yield target_lost
        self.assertEqual(echoed, payload)
        self.assertEqual(dialer.active, 0)
        self.assertEqual(resolver.asked, [])
        self.assertEqual(pair.gateway.stream_count, 0)
        self.assertEqual(pair.client.stream_count, 0)


class SystemResolverErrorTests(TestCase):
    """The dialer's own resolver: a getaddrinfo failure that is no gaierror ends its lookup."""

    @defer.inlineCallbacks
    def test_plain_oserror(self):
        """
        CPython raises a plain OSError for EAI_SYSTEM; Twisted's resolver
        expects gaierror only, and the lookup would never end, its place
        among the lookups taken for good.  Here it fails NAME_NOT_RESOLVED.
        """
        from anyproxy.client import dialer as dialer_module

        def failing(*args):
            raise OSError(errno.EMFILE, "Too many open files")
        self.patch(dialer_module.socket, "getaddrinfo", failing)
        lookups = Dialer(AccessPolicy(), reactor).lookups
        for owner in (1, 2):
            d = lookups.resolve("a%d.test" % (owner,), 53, owner=owner)
            reason = yield self.assertFailure(d.addTimeout(5, reactor), StreamOpenError)
            self.assertEqual(reason.reason, Reason.NAME_NOT_RESOLVED)
        self.assertEqual((lookups.running, lookups.owned), (0, 0))
