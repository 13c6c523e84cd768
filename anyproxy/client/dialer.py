# -*- test-case-name: tests.test_dialer -*-
"""
The client's side of every stream: check the target against access control,
resolve it, check every address it resolves to, connect to one of those
checked addresses (never re-resolving, so DNS rebinding cannot slip past the
check), then splice the stream to the target socket.
"""

import functools
import re
import socket

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet._resolver import GAIResolver
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from anyproxy.access_policy import ends_in_number, parse_ip_literal
from anyproxy.client import tcp_connect
from anyproxy.client.udp import TargetAssociation, UdpStats, serves_udp
from anyproxy.limits import DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT
from anyproxy.errors import Reason, StreamOpenError, reason_for_failure
from anyproxy.limits import Limiter
from anyproxy.logs import emits
from anyproxy.records import record_of
from anyproxy.splice import SpliceEnd

log = Logger()


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self, on_complete=None):
        self.addresses = []
        self.done = defer.Deferred()
        self._on_complete = on_complete

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self):
        # Also once done was cancelled (a timeout): the lookup itself ends only now.
        if self._on_complete is not None:
            self._on_complete()
        self.done.callback(self.addresses)


# A host name as a resolver takes it (after IDNA): labels of letters,
# digits, "-" and "_", dot-separated, a final dot allowed.
_HOST_NAME = re.compile(rb"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


@functools.lru_cache(maxsize=1024)
def literal_address(host):
    """
    C{host} as a normalised IP address string if it is an IP literal, else
    C{None}.  Cached: parsing with L{ipaddress} was a few percent of the
    client's CPU per stream, and targets repeat.
    """
    address = parse_ip_literal(host)
    return None if address is None else str(address)


def _getaddrinfo(*args):
    """
    C{socket.getaddrinfo}, whose every failure is a C{gaierror}: Twisted's
    resolver treats only those as "no addresses", and any other (an
    EAI_SYSTEM failure is a plain OSError) would leave its lookup
    unfinished, and its place among L{NameLookups} taken for good.
    """
    try:
        return socket.getaddrinfo(*args)
    except socket.gaierror:
        raise
    except (OSError, UnicodeError) as e:
        raise socket.gaierror(socket.EAI_FAIL, str(e)) from None


def _not_a_host_name(host):
    """A NAME_NOT_RESOLVED error if C{host} is no name a resolver should be asked, else C{None}."""
    try:
        # What the resolver does with the name first; a name it cannot
        # encode (an empty or over-long label) would fail there out of sight
        # of IHostnameResolver, whose answer then never comes.
        encoded = host.encode("idna")
    except UnicodeError:
        encoded = b""
    if not _HOST_NAME.fullmatch(encoded):
        # Spaces, "%", ":"... are in no host name, but a resolver may still
        # answer for them (a hosts file), and the policy read the asked text.
        return StreamOpenError(Reason.NAME_NOT_RESOLVED, "%r is not a valid host name" % (host,))
    if ends_in_number(encoded.decode("ascii")):
        # "127.1", "2130706433": getaddrinfo reads an IPv4 address in them,
        # which the gateway's rules for its user never saw as one.
        return StreamOpenError(Reason.NAME_NOT_RESOLVED,
                               "%r is not a host name; an IPv4 address is written a.b.c.d"
                               % (host,))
    return None


def resolve(resolver, host, port, on_complete=None):
    """
    A Deferred firing with the list of IP address strings C{host} resolves to.

    @param resolver: an C{IHostnameResolver} (normally C{reactor.nameResolver}).
    @param on_complete: called once the resolver has finished with a name
        it was asked for, even after the Deferred was cancelled.
    """
    address = literal_address(host)
    if address is not None:
        return defer.succeed([address])
    refused = _not_a_host_name(host)
    if refused is not None:
        return defer.fail(refused)
    return _look_up(resolver, host, port, on_complete)


def _look_up(resolver, host, port, on_complete=None):
    """L{resolve} for a C{host} already known to be a host name, not a literal."""
    collector = _Collector(on_complete)
    resolver.resolveHostName(collector, host, port)

    def check(addresses):
        if not addresses:
            raise StreamOpenError(Reason.NAME_NOT_RESOLVED, "%s does not resolve" % (host,))
        return addresses

    return collector.done.addCallback(check)


# Name lookups the client's resolver may have in hand at once: in all (a
# stream's, as many as max_concurrent_conns by default), for UDP associations
# together, and for one association.  The system resolver runs getaddrinfo in
# the reactor's thread pool (10 threads), where a lookup goes on after we
# stopped waiting for it: without a bound, datagrams to names that never
# answer, sent faster than they time out, queued lookups without end and
# starved every other one.  (A TCP stream's lookup is already paced by the
# slot it holds until connect_timeout.)
MAX_NAME_LOOKUPS = 1024
MAX_ASSOCIATION_LOOKUPS = 64
MAX_LOOKUPS_PER_ASSOCIATION = 16


class NameLookups:
    """
    The client's name lookups (L{resolve}), counted from the resolver's
    start to its real end, not to our timeout.  Past L{limit} in all, past
    L{owned_limit} for all owners (UDP associations) together, or past
    L{per_owner} for one, a lookup fails at once with OVERLOADED instead of
    queueing behind the others.
    """

    def __init__(self, resolver, limit=MAX_NAME_LOOKUPS, per_owner=MAX_LOOKUPS_PER_ASSOCIATION,
                 owned_limit=MAX_ASSOCIATION_LOOKUPS):
        self._resolver = resolver
        self.limit = limit
        self.per_owner = per_owner
        self.owned_limit = owned_limit
        self.running = 0
        self.owned = 0  # running for some owner
        self._owners = {}  # owner -> its lookups running
        self.refused = 0  # lookups refused at a bound

    def resolve(self, host, port, owner=None):
        """L{resolve} through the bounds; C{owner}: any hashable, e.g. an association's token."""
        address = literal_address(host)
        if address is not None:
            return defer.succeed([address])  # no lookup: answered at once
        refused = _not_a_host_name(host)
        if refused is not None:
            return defer.fail(refused)
        if self.running >= self.limit or owner is not None and (
                self.owned >= self.owned_limit
                or self._owners.get(owner, 0) >= self.per_owner):
            self.refused += 1
            return defer.fail(StreamOpenError(Reason.OVERLOADED,
                                              "too many name lookups in progress"))
        self.running += 1
        if owner is not None:
            self.owned += 1
            self._owners[owner] = self._owners.get(owner, 0) + 1
        # The resolver ends each lookup once (resolutionComplete).
        return _look_up(self._resolver, host, port, on_complete=lambda: self._complete(owner))

    def _complete(self, owner):
        self.running -= 1
        if owner is not None:
            self.owned -= 1
            left = self._owners[owner] - 1
            if left:
                self._owners[owner] = left
            else:
                del self._owners[owner]


def _acl_error(reason, addresses):
    """The error of a refusal after DNS, carrying the addresses checked (for L{Dialer.refusal_log})."""
    refused = StreamOpenError(reason, "forbidden by access control")
    refused.addresses = tuple(addresses)
    return refused


class _TargetEnd(SpliceEnd):
    """
    The target's end of a splice, made by one connection attempt: fires
    C{connected} once its connection is made.
    """

    def __init__(self, connected):
        super().__init__()
        self._connected = connected

    def connectionMade(self):
        connected, self._connected = self._connected, None
        if connected is not None and not connected.called:
            connected.callback(self)


class _ConnectAttempt(ClientFactory):
    """
    One TCP connect to a checked address, whose C{connected} Deferred fires
    with the target's L{_TargetEnd} or fails as the connection does.
    Cancelling it stops the attempt (and fails it with C{CancelledError}).

    What C{TCP4ClientEndpoint} + C{connectProtocol} did, without their
    wrapping factory and protocol: those cost a layer of calls on every
    event of the target connection and several objects per stream.

    @param connect_tcp: C{connectTCP}'s signature (L{tcp_connect.connect_tcp}
        bound to the reactor, or a reactor's own C{connectTCP}).
    """

    noisy = False
    _connector = None
    _cancelled = False

    def __init__(self, connect_tcp, address, port, timeout):
        self.connected = defer.Deferred(self._cancel)
        self._end = _TargetEnd(self.connected)
        try:
            connector = connect_tcp(address, port, self, timeout=timeout)
            if self._end is not None:  # not failed in the call
                self._connector = connector
        except Exception:
            # Raised at once, e.g. an IPv6 literal whose zone names no
            # interface of ours (looked up in the call).
            self._end = None
            if not self.connected.called:
                self.connected.errback()

    def buildProtocol(self, addr):
        # Connected: nothing left to cancel.  The connector refers to us and
        # the end will refer to the connection: no path back from us.
        self._connector = None
        end, self._end = self._end, None
        return end

    def clientConnectionFailed(self, connector, reason):
        self._connector = None
        self._end = None
        if self._cancelled:
            return  # Deferred.cancel fails it with CancelledError: no next address is tried
        if not self.connected.called:
            self.connected.errback(reason)

    def clientConnectionLost(self, connector, reason):
        # The connector and its transport refer to each other; Twisted drops
        # the link only when a connection fails.  Dropping it here too lets
        # refcounting free both at once.
        connector.transport = None

    def _cancel(self, _):
        connector, self._connector = self._connector, None
        if connector is not None:
            self._cancelled = True
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass  # it has just connected or failed


# Access control decisions kept per policy (Dialer._decide): a policy is a
# pure function of (host, port, addresses), so a repeated target is checked
# once.  Bounded: the table is dropped when it reaches this many entries.
MAX_CACHED_DECISIONS = 4096


class Dialer:
    """
    Answers the gateway's OPEN requests.

    Every stream holds one of C{max_streams} slots (L{anyproxy.limits}) from
    the moment it is admitted until it ends; an OPEN finding them all taken
    waits for one in a bounded queue.  Spliced TCP streams are swept for
    idleness by one C{LoopingCall}, running only while there are some: a
    stream records when it last carried a byte (C{Stream.last_active}), so no
    timer is touched per DATA frame.

    @param policy: an L{anyproxy.access_policy.AccessPolicy}.
    @param max_streams: open streams at most (client.max_concurrent_conns);
        0 = unlimited.  Beyond it an OPEN waits (at most C{queue_size} of
        them, each at most C{queue_timeout} seconds) for a stream to end, and
        is then refused with OVERLOADED.
    @param resolver: an C{IHostnameResolver}; default C{reactor.nameResolver}.
    @param idle_timeout: seconds without a byte either way before a TCP
        stream is closed (both ends), and without a datagram before a UDP
        association is; 0 = never.
    @param connect_tcp: makes target connections, with C{connectTCP}'s
        arguments; default L{tcp_connect.connect_tcp} on C{reactor}.

    @ivar udp_stats: a L{UdpStats} aggregating every UDP association.
    @ivar slots: the L{Limiter} of C{max_streams}.
    """

    # How often idle streams are looked for, as a fraction of idle_timeout:
    # a stream is closed between idle_timeout and 1.1 x idle_timeout.
    IDLE_SWEEP_FRACTION = 10
    acl_refusals = 0  # streams refused by access control (metrics)
    # Told of each refusal (an anyproxy.client.status.refusals.RefusalLog,
    # for the status page), or None.
    refusal_log = None

    def __init__(self, policy, reactor, connect_timeout=10.0, max_streams=100, resolver=None,
                 idle_timeout=300.0, queue_size=DEFAULT_QUEUE_SIZE,
                 queue_timeout=DEFAULT_QUEUE_TIMEOUT, connect_tcp=None):
        self.policy = policy
        self._reactor = reactor
        self._connect_tcp = connect_tcp if connect_tcp is not None else functools.partial(
            tcp_connect.connect_tcp, reactor)
        self._resolver = resolver if resolver is not None else GAIResolver(
            reactor, getThreadPool=lambda: reactor.getThreadPool(), getaddrinfo=_getaddrinfo)
        self.lookups = NameLookups(self._resolver)
        self.connect_timeout = connect_timeout
        self.slots = Limiter(reactor, max_streams, queue_size, queue_timeout,
                             what="max_concurrent_conns")
        self.udp_stats = UdpStats()
        self._spliced = {}  # tcp stream joined to a target -> the target's address
        self._associations = set()  # udp streams
        self._sweeper = None
        self.idle_timeout = idle_timeout
        self._decisions = {}  # (host, port[, addresses]) -> Reason or None, for _decisions_for
        self._decisions_for = None

    @property
    def max_streams(self):
        """The seed's C{max_concurrent_conns}; setting it admits waiters if raised."""
        return self.slots.limit

    @max_streams.setter
    def max_streams(self, value):
        self.slots.configure(limit=value)

    @property
    def active(self):
        """Streams holding a slot: connecting, spliced or associated."""
        return self.slots.active()

    def records(self):
        """
        An L{anyproxy.records.StreamRecord} (id, target, created, last
        active, bytes) for every open TCP and UDP stream.
        """
        return [record_of(stream) for stream in list(self._spliced) + list(self._associations)]

    def set_policy(self, policy):
        """
        Use C{policy} from now on, also for open TCP streams: those it no
        longer allows (by name or by the address they reached) are reset,
        so a reload revokes access at once.  UDP associations check every
        datagram against the policy in force anyway.
        """
        self.policy = policy
        for stream, address in list(self._spliced.items()):
            refused = policy.check_resolved(stream.host, stream.port, "tcp", [address])
            if refused is not None:
                self.acl_refusals += 1
                log.warn("stream {sid} to {host}:{port}: no longer allowed after a reload; "
                         "closing", sid=stream.stream_id, host=stream.host, port=stream.port)
                stream.reset(refused)

    def handle_open(self, stream):
        """Called by the mux with each incoming stream request."""
        if stream.kind == "udp":
            # One association, many targets: each datagram is checked in TargetAssociation.
            if not serves_udp(self.policy):
                self._refuse(stream, Reason.PROTOCOL_NOT_ALLOWED, "udp is not allowed")
                return
            self._when_admitted(stream, self._associate)
            return
        if stream.kind != "tcp":
            stream.reject(Reason.PROTOCOL_NOT_ALLOWED, "only tcp streams are served")
            return
        refused = self._decide(stream.host, stream.port)
        if refused is not None:
            self._refuse(stream, refused, "forbidden by access control")
            return
        self._when_admitted(stream, self._open_tcp)

    def _decide(self, host, port, addresses=None):
        """
        The policy's C{check_name} (C{addresses} C{None}) or C{check_resolved}
        answer for a TCP target, from the decisions kept for the policy in
        force.
        """
        policy = self.policy
        decisions = self._decisions
        if self._decisions_for is not policy or len(decisions) >= MAX_CACHED_DECISIONS:
            decisions.clear()
            self._decisions_for = policy
        key = (host, port) if addresses is None else (host, port, tuple(addresses))
        try:
            return decisions[key]
        except KeyError:
            pass
        if addresses is None:
            refused = policy.check_name(host, port, "tcp")
        else:
            refused = policy.check_resolved(host, port, "tcp", addresses)
        decisions[key] = refused
        return refused

    def _when_admitted(self, stream, proceed):
        release = self.slots.try_acquire()
        if release is not None:
            proceed(stream, release)  # the usual case: no Deferred
            return
        waiting = self.slots.acquire()
        if not waiting.called:
            log.debug("{kind} stream {sid} to {host}:{port} waits for a slot "
                      "({active} open, max_concurrent_conns)", kind=stream.kind,
                      sid=stream.stream_id, host=stream.host, port=stream.port,
                      active=self.active)
            # The gateway giving up (RESET) takes it out of the queue.
            stream.set_cancel_hook(waiting.cancel)
        waiting.addCallbacks(lambda release: proceed(stream, release),
                             lambda failure: self._not_admitted(stream, failure))

    def _not_admitted(self, stream, failure):
        if failure.check(defer.CancelledError) or stream.closed:
            return None
        log.warn("refusing {kind} {host}:{port}: {error}", kind=stream.kind,
                 host=stream.host, port=stream.port, error=failure.getErrorMessage())
        stream.reject(Reason.OVERLOADED, "client at max_concurrent_conns")
        return None

    def _associate(self, stream, release):
        if stream.closed:
            release()
            return

        def closed(association):
            self._associations.discard(stream)
            release()

        self._associations.add(stream)
        stream.accept(TargetAssociation(
            lambda: self.policy, self._reactor,
            # Its own token: its lookups are bounded by their real end.
            functools.partial(self.lookups.resolve, owner=object()),
            idle_timeout=self.idle_timeout, parent_stats=self.udp_stats, on_close=closed))

    def _open_tcp(self, stream, release):
        if stream.closed:
            release()
            return
        d = self._dial(stream)
        stream.set_cancel_hook(d.cancel)
        d.addCallbacks(lambda connected: self._connected(stream, *connected, release),
                       lambda failure: self._failed(stream, failure, release))

    def _dial(self, stream):
        """A Deferred firing with C{(target, the policy it was checked against)}."""
        host, port = stream.host, stream.port
        address = literal_address(host)
        if address is not None:
            # An IP literal: nothing to resolve, so no Deferred before the connect.
            policy = self.policy
            refused = self._decide(host, port, [address])
            if refused is not None:
                return defer.fail(_acl_error(refused, [address]))
            d = self._connect_any([address], port).addCallback(lambda target: (target, policy))
            d.addTimeout(self.connect_timeout, self._reactor)
            return d
        d = self.lookups.resolve(host, port)

        def checked(addresses):
            policy = self.policy
            refused = self._decide(host, port, addresses)
            if refused is not None:
                raise _acl_error(refused, addresses)
            return self._connect_any(addresses, port).addCallback(
                lambda target: (target, policy))

        d.addCallback(checked)
        d.addTimeout(self.connect_timeout, self._reactor)
        return d

    def _connect_any(self, addresses, port):
        """
        Connect to each checked address in turn until one answers; the last
        failure is the answer.  Cancelling stops the attempt in progress and
        tries no further address.
        """
        d = _ConnectAttempt(self._connect_tcp, addresses[0], port, self.connect_timeout).connected
        if len(addresses) > 1:
            def next_address(failure):
                if failure.check(defer.CancelledError):
                    return failure
                return self._connect_any(addresses[1:], port)
            d.addErrback(next_address)
        return d

    def _connected(self, stream, target, checked_with, release):
        if stream.closed:
            target.transport.loseConnection()
            release()
            return
        address = target.transport.getPeer().host
        # A reload while we were connecting: check the policy in force now.
        refused = None if self.policy is checked_with else self.policy.check_resolved(
            stream.host, stream.port, "tcp", [address])
        if refused is not None:
            target.transport.loseConnection()
            release()
            self._refuse(stream, refused, "forbidden by access control", [address])
            return
        end = SpliceEnd()
        end.on_close = lambda end, reason: self._stream_done(stream, release)
        self._spliced[stream] = address
        stream.accept(end, (address, target.transport.getPeer().port))
        end.join(target)
        if emits(LogLevel.debug):
            log.debug("stream {sid} connected to {host}:{port}", sid=stream.stream_id,
                      host=stream.host, port=stream.port)
        if stream in self._spliced:
            self._watch_idle()

    def _stream_done(self, stream, release):
        self._spliced.pop(stream, None)
        release()
        if not self._spliced:
            self.stop()

    def _failed(self, stream, failure, release):
        release()
        reason = reason_for_failure(failure)
        if reason is Reason.NOT_ALLOWED or reason is Reason.PROTOCOL_NOT_ALLOWED:
            self._refuse(stream, reason, failure.getErrorMessage(),
                         getattr(failure.value, "addresses", ()))
            return
        log.info("stream to {host}:{port} failed: {reason}", host=stream.host,
                 port=stream.port, reason=reason.name)
        stream.reject(reason, failure.getErrorMessage())

    def _refuse(self, stream, reason, text, addresses=()):
        self.acl_refusals += 1
        if self.refusal_log is not None:
            self.refusal_log.record(self.policy, stream.host, stream.port, stream.kind,
                                    addresses)
        log.warn("refused {host}:{port} ({why})", host=stream.host, port=stream.port, why=text)
        stream.reject(reason, text)

    # -- idle timeout -------------------------------------------------------

    def _watch_idle(self):
        if self.idle_timeout > 0 and self._sweeper is None:
            self._sweeper = task.LoopingCall(self._sweep_idle)
            self._sweeper.clock = self._reactor
            self._sweeper.start(self.idle_timeout / self.IDLE_SWEEP_FRACTION, now=False)

    @property
    def idle_timeout(self):
        """Seconds without a byte before a spliced stream is closed; 0: never."""
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, value):
        # A reload: the sweep restarts at the new pace (or stops for 0).
        self._idle_timeout = value
        self.stop()
        if self._spliced:
            self._watch_idle()

    def _sweep_idle(self):
        if self.idle_timeout <= 0:
            self.stop()
            return
        now = self._reactor.seconds()
        for stream in [s for s in self._spliced if now - s.last_active >= self.idle_timeout]:
            log.info("stream {sid} to {host}:{port}: no bytes for {idle:.0f}s "
                     "(idle_timeout); closing", sid=stream.stream_id, host=stream.host,
                     port=stream.port, idle=now - stream.last_active)
            # A reset closes the user's end at the gateway as well; our end's
            # SpliceEnd then closes the target connection.
            stream.reset(Reason.TIMED_OUT)
        if not self._spliced:
            self.stop()

    def stop(self):
        """Stop the idle sweep (it restarts with the next spliced stream)."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()
