# -*- test-case-name: tests.test_tcp_connect -*-
"""
An outgoing TCP connection to an IP address, started in the call.

The client opens a target connection for every stream, so what a connect
costs is paid per user connection.  Twisted's C{connectTCP} starts the
connect a reactor turn later, changes the socket's epoll registration five
times and builds a connector and a client transport around it.  L{connect_tcp} takes C{connectTCP}'s arguments and
calls the factory as it does, for an address that needs neither a lookup
nor a bind: it connects at once, waits for the socket to become writable,
and hands the connected socket to Twisted's TCP transport, as
C{adoptStreamConnection} does.  Measured: 54 µs of CPU against 78 for one
connect and close to a loopback listener, and about 10 µs (6%) less of the
client's CPU per CONNECT tunnel (benchmarks/results/open-profile.md).
"""

import errno
import os
import socket

from twisted.internet import address, error, tcp
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

# Linux creates the socket non-blocking in the same call.
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
# What a non-blocking connect answers while it goes on (the first call), and
# when asked again before it is done.
_IN_PROGRESS = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)
_STILL_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


def _socket_address(host, port):
    """C{(family, address for connect)} of an IP literal; an IPv6 zone is looked up numerically."""
    if ":" in host:
        return socket.AF_INET6, socket.getaddrinfo(
            host, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4]
    return socket.AF_INET, (host, port)


def connect_tcp(reactor, host, port, factory, timeout=None):
    """
    Connect to the IP address C{host}, as C{reactor.connectTCP(host, port,
    factory, timeout)} does: C{factory.buildProtocol} once connected, else
    C{factory.clientConnectionFailed}.  Raises as C{connectTCP} does for an
    IPv6 zone that names no interface (C{socket.gaierror}).

    @param reactor: a reactor with C{IReactorFDSet}.
    @param timeout: seconds before the attempt fails with
        C{TimeoutError}; C{None}: no bound of its own.
    @return: the L{TCPConnectAttempt}, whose C{stopConnecting} stops it.
    """
    return TCPConnectAttempt(reactor, host, port, factory, timeout)


@implementer(IReadWriteDescriptor)
class TCPConnectAttempt:
    """
    A connect in progress, watched by the reactor until its socket is
    writable (connected, or failed: the error is in C{SO_ERROR}).  It has
    the parts of Twisted's C{IConnector} a factory uses:
    L{stopConnecting} and L{getDestination}.
    """

    def __init__(self, reactor, host, port, factory, timeout=None):
        self._reactor = reactor
        self._factory = factory
        self._destination = (host, port)
        self._timer = None  # the deadline, or a failure waiting to be told
        self._watched = False
        self._socket = None
        family, self._address = _socket_address(host, port)
        self._family = family
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as e:
            self._fail_soon(error.ConnectBindError(e.errno, e.strerror))
            return
        self._socket = sock
        if not _NONBLOCK:
            sock.setblocking(False)
        code = self._connect_ex()
        if code not in _IN_PROGRESS:
            self._fail_soon(error.getConnectError((code, os.strerror(code))))
            return
        self._watched = True
        reactor.addWriter(self)
        if timeout is not None:
            self._timer = reactor.callLater(timeout, self._fail, error.TimeoutError())

    # -- IConnector's part -----------------------------------------------------

    def stopConnecting(self):
        """Stop the attempt: the factory hears C{UserError}, as from Twisted's connector."""
        if self._socket is None and self._timer is None:
            raise error.NotConnectingError("already connected or failed")
        self._fail(error.UserError(string="Connection was cancelled"))

    def getDestination(self):
        host, port = self._destination
        if self._family == socket.AF_INET6:
            return address.IPv6Address("TCP", host, port)
        return address.IPv4Address("TCP", host, port)

    # -- IReadDescriptor, IWriteDescriptor ---------------------------------------

    def fileno(self):
        return self._socket.fileno() if self._socket is not None else -1

    def logPrefix(self):
        return "TCPConnectAttempt"

    def doRead(self):
        # Only watched for writing: a readable event is one meant for an
        # earlier socket with the same number, closed this reactor turn.
        return None

    def doWrite(self):
        sock = self._socket
        if sock is None:
            return None  # failed earlier in this reactor turn
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or self._connect_ex()
        if code in _STILL_CONNECTING:
            # An event meant for an earlier socket with this number (closed
            # and reused this turn): keep waiting, as Twisted's doConnect.
            return None
        if code not in (0, errno.EISCONN):
            self._fail(error.getConnectError((code, os.strerror(code))))
            return None
        self._unwatch()
        self._socket = None
        self._stop_timer()
        peer = (address.IPv6Address if self._family == socket.AF_INET6
                else address.IPv4Address)("TCP", *self._address)
        try:
            protocol = self._factory.buildProtocol(peer)
        except Exception:
            sock.close()
            self._factory.clientConnectionFailed(self, Failure())
            return None
        if protocol is None:
            sock.close()
            return None
        transport = tcp.Server(sock, protocol, self._address, None, 0, self._reactor)
        transport.repstr = "<%s to %s:%d>" % ((type(protocol).__name__,) + self._destination)
        try:
            protocol.makeConnection(transport)
        except Exception:
            log.failure("{protocol} failed to start on its target connection",
                        protocol=type(protocol).__name__)
            transport.abortConnection()
        return None

    def connectionLost(self, reason):
        # The reactor dropped the socket: an error or hang-up while
        # connecting (a refused connect shows so), or its shutdown.
        self._watched = False
        code = 0
        if self._socket is not None:
            try:
                code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                pass
            if (not code and getattr(self._reactor, "running", False)
                    and not getattr(self._reactor, "_stopped", False)
                    and self._connect_ex() in _STILL_CONNECTING):
                # A hang-up meant for an earlier socket with this number
                # (closed and reused this turn), as doWrite's stale events:
                # this connect goes on.
                self._watched = True
                self._reactor.addWriter(self)
                return
        self._fail(error.getConnectError((code, os.strerror(code))) if code
                   else error.ConnectError(string=reason.getErrorMessage()))

    # -- internals ---------------------------------------------------------------

    def _unwatch(self):
        if self._watched:
            self._watched = False
            self._reactor.removeWriter(self)

    def _stop_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connect_ex(self):
        try:
            return self._socket.connect_ex(self._address)
        except OSError as e:  # e.g. an address of the wrong family
            return e.errno or errno.EINVAL

    def _fail_soon(self, exception):
        # A failure found in the call is told on the next turn, as Twisted's
        # connector does: a caller trying address after address must not
        # recurse once per address (a name may have hundreds).
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._timer = self._reactor.callLater(0, self._report, exception)

    def _fail(self, exception):
        if self._socket is None and self._timer is None:
            return
        self._unwatch()
        self._stop_timer()
        if self._socket is not None:
            sock, self._socket = self._socket, None
            sock.close()
        self._report(exception)

    def _report(self, exception):
        self._timer = None
        self._factory.clientConnectionFailed(self, Failure(exception))
