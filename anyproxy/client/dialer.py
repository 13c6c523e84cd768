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

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from anyproxy.client.udp import UdpAssociation, UdpStats, serves_udp
from anyproxy.errors import Reason, StreamOpenError
from anyproxy.splice import SpliceEnd

log = Logger()


def reason_for_failure(failure):
    """The L{Reason} a failed resolve/connect maps to (DESIGN.md section 5)."""
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

    @param policy: an L{anyproxy.client.acl.AccessPolicy}.
    @param max_streams: open streams at most (the seed's max_concurrent_conns);
        more are refused with OVERLOADED.
    @param resolver: an C{IHostnameResolver}; default C{reactor.nameResolver}.
    @param idle_timeout: seconds without a datagram either way before a UDP
        association is closed; 0 = never.

    @ivar udp_stats: a L{UdpStats} aggregating every UDP association.
    """

    def __init__(self, policy, reactor, connect_timeout=10.0, max_streams=100, resolver=None,
                 idle_timeout=300.0):
        self.policy = policy
        self._reactor = reactor
        self._resolver = resolver if resolver is not None else reactor.nameResolver
        self.connect_timeout = connect_timeout
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.udp_stats = UdpStats()
        self.active = 0

    def handle_open(self, stream):
        """Called by the mux with each incoming stream request."""
        if stream.kind == "udp":
            # One association, many targets: each datagram is checked in UdpAssociation.
            if not serves_udp(self.policy):
                self._refuse(stream, Reason.PROTOCOL_NOT_ALLOWED, "udp is not allowed")
                return
            if self.max_streams and self.active >= self.max_streams:
                log.warn("refusing a udp association: {active} streams open "
                         "(max_concurrent_conns)", active=self.active)
                stream.reject(Reason.OVERLOADED, "client at max_concurrent_conns")
                return
            self.active += 1
            stream.accept(UdpAssociation(
                lambda: self.policy, self._reactor, functools.partial(resolve, self._resolver),
                idle_timeout=self.idle_timeout, parent_stats=self.udp_stats,
                on_close=lambda association: self._stream_done()))
            return
        if stream.kind != "tcp":
            stream.reject(Reason.PROTOCOL_NOT_ALLOWED, "only tcp streams are served")
            return
        if self.max_streams and self.active >= self.max_streams:
            log.warn("refusing {host}:{port}: {active} streams open (max_concurrent_conns)",
                     host=stream.host, port=stream.port, active=self.active)
            stream.reject(Reason.OVERLOADED, "client at max_concurrent_conns")
            return
        refused = self.policy.check_name(stream.host, stream.port, "tcp")
        if refused is not None:
            self._refuse(stream, refused, "forbidden by access control")
            return
        self.active += 1
        d = self._dial(stream)
        stream.set_cancel_hook(d.cancel)
        d.addCallbacks(lambda target: self._connected(stream, target),
                       lambda failure: self._failed(stream, failure))

    def _dial(self, stream):
        d = resolve(self._resolver, stream.host, stream.port)

        def checked(addresses):
            refused = self.policy.check_resolved(stream.host, stream.port, "tcp", addresses)
            if refused is not None:
                raise StreamOpenError(refused, "forbidden by access control")
            return self._connect_any(addresses, stream.port)

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
                target = yield connectProtocol(endpoint, SpliceEnd())
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

    def _connected(self, stream, target):
        if stream.closed:
            target.transport.loseConnection()
            self.active -= 1
            return
        end = SpliceEnd()
        end.on_close = lambda end, reason: self._stream_done()
        stream.accept(end)
        end.join(target)
        log.debug("stream {sid} connected to {host}:{port}", sid=stream.stream_id,
                  host=stream.host, port=stream.port)

    def _stream_done(self):
        self.active -= 1

    def _failed(self, stream, failure):
        self.active -= 1
        reason = reason_for_failure(failure)
        if reason is Reason.NOT_ALLOWED or reason is Reason.PROTOCOL_NOT_ALLOWED:
            self._refuse(stream, reason, failure.getErrorMessage())
            return
        log.info("stream to {host}:{port} failed: {reason}", host=stream.host,
                 port=stream.port, reason=reason.name)
        stream.reject(reason, failure.getErrorMessage())

    def _refuse(self, stream, reason, text):
        log.warn("refused {host}:{port} ({why})", host=stream.host, port=stream.port, why=text)
        stream.reject(reason, text)
