# -*- test-case-name: tests.test_frontend_plugins -*-
"""
An example frontend plugin, walked through in docs/FRONTENDS.md:
C{fixed-forward} carries every accepted TCP connection through the tunnel
to one fixed target, like C{ssh -L}.

    proxy:
      frontends:
        - type: fixed-forward
          listen_addr: "127.0.0.1:2222"
          options: {target_host: "10.0.0.5", target_port: 22}

Raw TCP has no place for credentials, so this frontend authenticates nobody
(C{authenticates = False}): the config refuses C{auth_username} for it and
allows it only on loopback or with C{allow_anonymous: true}.  Its streams
belong to the anonymous user, so they go to clients of group C{default},
and the client's access control applies to the target as for proxy traffic.

A connection has two phases, both run by L{open_and_splice}.  Opening:
reading from the user is paused while the tunnel stream opens (bytes and an
EOF that arrive anyway are kept for the target), and a user who leaves cancels
the open.  Spliced: the two connections are joined, with backpressure and
half-close both ways.  A target that cannot be reached closes the user's
connection; the reason is logged.
"""

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from anyproxy.addresses import host_port
from anyproxy.auth import ANONYMOUS
from anyproxy.errors import StreamOpenError
from anyproxy.interfaces import IFrontendFactory, OptionError, reject_unknown_options
from anyproxy.splice import SpliceEnd, open_and_splice


class FixedForwardProtocol(SpliceEnd):
    """One user connection, forwarded to C{factory.target_host:target_port}."""

    _log = Logger()

    def connectionMade(self):
        factory = self.factory
        self._peer = getattr(self.transport.getPeer(), "host", "?")
        context = factory.context
        # Reading pauses until the stream is open; a user who leaves cancels the open.
        opening = open_and_splice(
            self, lambda: context.endpoint_for(ANONYMOUS, factory.target_host, factory.target_port))
        opening.addCallbacks(self._spliced, self._open_failed)

    def _spliced(self, target):
        if target is not None:  # None: the user left first
            self._log.info("{name} {peer} -> {target}: connected", name=self.factory.context.name,
                           peer=self._peer, target=self.factory.target)

    def _open_failed(self, failure):
        if failure.check(StreamOpenError):
            self._log.info("{name} {peer} -> {target}: {error}", name=self.factory.context.name,
                           peer=self._peer, target=self.factory.target, error=str(failure.value))
        else:
            self._log.failure("{name} {peer} -> {target}: open failed", failure,
                              name=self.factory.context.name, peer=self._peer,
                              target=self.factory.target)
        self.transport.loseConnection()


class FixedForwardFactory(Factory):
    """
    Builds L{FixedForwardProtocol}s for one listener.

    @ivar context: the L{anyproxy.interfaces.FrontendContext}.
    @ivar target_host: where every connection goes (resolved by the client).
    @ivar target_port: the port there.
    """

    protocol = FixedForwardProtocol

    def __init__(self, context, target_host, target_port):
        self.context = context
        self.target_host = target_host
        self.target_port = target_port
        self.target = host_port(target_host, target_port)


@implementer(IPlugin, IFrontendFactory)
class FixedForwardFrontend:
    """The C{fixed-forward} plugin: options C{target_host} and C{target_port}."""

    name = "fixed-forward"
    description = "forward every TCP connection to one fixed target (like ssh -L); no auth"
    authenticates = False

    def check_options(self, options):
        reject_unknown_options(options, ("target_host", "target_port"))
        host = options.get("target_host")
        if not isinstance(host, str) or not host.strip():
            raise OptionError("target_host", "required, a host name or IP address")
        port = options.get("target_port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise OptionError("target_port", "required, a port number 1-65535 (got %r)"
                              % (port,))

    def build(self, options, context):
        return FixedForwardFactory(context, options["target_host"].strip(),
                                   options["target_port"])


fixed_forward = FixedForwardFrontend()
