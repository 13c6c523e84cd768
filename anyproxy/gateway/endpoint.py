# -*- test-case-name: tests.test_e2e_tcp -*-
"""
L{TunnelEndpoint}: an C{IStreamClientEndpoint} whose connections are streams
through a client tunnel.  Frontends (SOCKS5, HTTP) use it exactly like a TCP
endpoint, so any Twisted protocol runs over the tunnel unchanged.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from anyproxy.errors import Reason, StreamOpenError

# A client answers OPEN within its own connect timeout; this bounds the wait if
# it never does (a wedged client whose pings still flow).
DEFAULT_OPEN_TIMEOUT = 60.0


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    Connect to C{host:port} through a tunnel of C{group}.

    @param wait: seconds to wait for a tunnel of the group to connect when
        none is (then the connection fails with NO_TUNNEL).
    """

    def __init__(self, registry, clock, group, host, port, kind="tcp", wait=3.0,
                 open_timeout=DEFAULT_OPEN_TIMEOUT):
        self._registry = registry
        self._clock = clock
        self.group = group
        self.host = host
        self.port = port
        self.kind = kind
        self._wait = wait
        self._open_timeout = open_timeout

    def open_stream(self):
        """A Deferred firing with an accepted L{anyproxy.tunnel.mux.Stream}."""
        d = self._registry.wait_for(self.group, self._wait)
        d.addCallback(lambda tunnel: tunnel.mux.open_stream(self.kind, self.host, self.port))

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            raise StreamOpenError(Reason.TIMED_OUT, "client did not answer in time")

        d.addTimeout(self._open_timeout, self._clock)
        return d.addErrback(timed_out)

    def connect(self, protocol_factory):
        def attach(stream):
            protocol = protocol_factory.buildProtocol(stream.getPeer())
            if protocol is None:
                stream.reset(Reason.GENERAL_FAILURE)
                raise StreamOpenError(Reason.GENERAL_FAILURE, "no protocol for the stream")
            stream.attach(protocol)
            return protocol

        return self.open_stream().addCallback(attach)
