# -*- test-case-name: tests.test_dialer -*-
"""
The client's side of every stream: check the target against access control,
resolve it, check every address it resolves to, connect to one of those
checked addresses (never re-resolving, so DNS rebinding cannot slip past the
check), then splice the stream to the target socket.
"""

import errno
import functools
import ipaddress

from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from anyproxy.client.udp import TargetAssociation, UdpStats, serves_udp
from anyproxy.limits import DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT
from anyproxy.connect_protocol import connect_protocol
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.limits import Limiter
from anyproxy.logs import emits
from anyproxy.records import record_of
from anyproxy.splice import SpliceEnd

log = Logger()


def reason_for_failure(failure):
    """The L{Reason} a failed resolve/connect maps to."""
    exc = failure.value
    if isinstance(exc, StreamOpenError):
        return exc.reason
    if isinstance(exc, error.ConnectionRefusedError):
        return Reason.CONNECTION_REFUSED
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError,
                        defer.CancelledError)):
        return Reason.TIMED_OUT
    if isinstance(exc, error.DNSLookupError):
        return Reason.NAME_NOT_RESOLVED
    # Before NoRouteError: Twisted raises NoRouteError for ENETUNREACH too.
    os_error = getattr(exc, "osError", None)
    if os_error == errno.ENETUNREACH:
        return Reason.NETWORK_UNREACHABLE
    if os_error in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return Reason.HOST_UNREACHABLE
    if isinstance(exc, error.NoRouteError):
        return Reason.HOST_UNREACHABLE
    return Reason.GENERAL_FAILURE


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self):
        self.addresses = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


def resolve(resolver, host, port):
    """
    A Deferred firing with the list of IP address strings C{host} resolves to.

    @param resolver: an C{IHostnameResolver} (normally C{reactor.nameResolver}).
    """
    try:
        return defer.succeed([str(ipaddress.ip_address(host.strip("[]")))])
    except ValueError:
        pass
    collector = _Collector()
    resolver.resolveHostName(collector, host, port)

    def check(addresses):
        if not addresses:
            raise StreamOpenError(Reason.NAME_NOT_RESOLVED, "%s does not resolve" % (host,))
        return addresses

    return collector.done.addCallback(check)


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

    @ivar udp_stats: a L{UdpStats} aggregating every UDP association.
    @ivar slots: the L{Limiter} of C{max_streams}.
    """

    # How often idle streams are looked for, as a fraction of idle_timeout:
    # a stream is closed between idle_timeout and 1.1 x idle_timeout.
    IDLE_SWEEP_FRACTION = 10
    acl_refusals = 0  # streams refused by access control (metrics)

    def __init__(self, policy, reactor, connect_timeout=10.0, max_streams=100, resolver=None,
                 idle_timeout=300.0, queue_size=DEFAULT_QUEUE_SIZE,
                 queue_timeout=DEFAULT_QUEUE_TIMEOUT):
        self.policy = policy
        self._reactor = reactor
        self._resolver = resolver if resolver is not None else reactor.nameResolver
        self.connect_timeout = connect_timeout
        self.slots = Limiter(reactor, max_streams, queue_size, queue_timeout,
                             what="max_concurrent_conns")
        self.idle_timeout = idle_timeout
        self.udp_stats = UdpStats()
        self._spliced = {}  # tcp stream joined to a target -> the target's address
        self._associations = set()  # udp streams
        self._sweeper = None

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
        refused = self.policy.check_name(stream.host, stream.port, "tcp")
        if refused is not None:
            self._refuse(stream, refused, "forbidden by access control")
            return
        self._when_admitted(stream, self._open_tcp)

    def _when_admitted(self, stream, proceed):
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
            lambda: self.policy, self._reactor, functools.partial(resolve, self._resolver),
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
        d = resolve(self._resolver, stream.host, stream.port)

        def checked(addresses):
            policy = self.policy
            refused = policy.check_resolved(stream.host, stream.port, "tcp", addresses)
            if refused is not None:
                raise StreamOpenError(refused, "forbidden by access control")
            return self._connect_any(addresses, stream.port).addCallback(
                lambda target: (target, policy))

        d.addCallback(checked)
        d.addTimeout(self.connect_timeout, self._reactor)
        return d

    @defer.inlineCallbacks
    def _connect_any(self, addresses, port):
        # Try each checked address in turn; the last failure is the answer.
        last = None
        for address in addresses:
            endpoint_class = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = endpoint_class(self._reactor, address, port, timeout=self.connect_timeout)
            try:
                target = yield connect_protocol(endpoint, SpliceEnd())
            except defer.CancelledError:
                raise
            except error.ConnectingCancelledError:
                # How an endpoint reports a cancelled connect: stop here (no
                # next address) and fail as a cancel, so addTimeout says TIMED_OUT.
                raise defer.CancelledError()
            except Exception as e:
                last = e
                continue
            return target
        raise last

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
            self._refuse(stream, refused, "forbidden by access control")
            return
        end = SpliceEnd()
        end.on_close = lambda end, reason: self._stream_done(stream, release)
        self._spliced[stream] = address
        stream.accept(end)
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
            self._refuse(stream, reason, failure.getErrorMessage())
            return
        log.info("stream to {host}:{port} failed: {reason}", host=stream.host,
                 port=stream.port, reason=reason.name)
        stream.reject(reason, failure.getErrorMessage())

    def _refuse(self, stream, reason, text):
        self.acl_refusals += 1
        log.warn("refused {host}:{port} ({why})", host=stream.host, port=stream.port, why=text)
        stream.reject(reason, text)

    # -- idle timeout -------------------------------------------------------

    def _watch_idle(self):
        if self.idle_timeout > 0 and self._sweeper is None:
            self._sweeper = task.LoopingCall(self._sweep_idle)
            self._sweeper.clock = self._reactor
            self._sweeper.start(self.idle_timeout / self.IDLE_SWEEP_FRACTION, now=False)

    def _sweep_idle(self):
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
