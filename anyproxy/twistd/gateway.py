# -*- test-case-name: tests.test_drain -*-
"""
C{twistd anyproxy-gateway}: see L{anyproxy.gateway.app}.

SIGTERM (or SIGINT) makes twistd stop the services, and the gateway drains
first (C{gateway.drain_timeout}, L{anyproxy.gateway.drain}).  twistd's own
handlers ignore a second signal while the shutdown waits, so
L{SecondSignalCuts} takes SIGTERM and SIGINT over once the stop has begun:
a second one ends the drain at once.
"""

import signal

from twisted.application.service import Service
from twisted.logger import Logger

from anyproxy.twistd.options import ConfigOptions

log = Logger()


class Options(ConfigOptions):
    role = "gateway"
    synopsis = "[--config=etc/anyproxy.yaml]"
    longdesc = ("Run the AnyProxy gateway: the HTTP/SOCKS5 proxies for users and the "
                "WebSocket+TLS server that clients connect to.")


class SecondSignalCuts(Service):
    """
    While the program stops, SIGTERM and SIGINT end the gateway's drain
    (L{anyproxy.gateway.app.Gateway.cut_drain}).  Stopped before the
    gateway (it is the root's last child), it installs its handlers just
    as the drain begins.  Python runs signal handlers between bytecodes,
    wherever the reactor is, so the handler only schedules the cut with
    C{callFromThread} (which also wakes the reactor).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, gateway, reactor):
        self._gateway = gateway
        self._reactor = reactor

    def stopService(self):
        super().stopService()
        for number in self.SIGNALS:
            signal.signal(number, self._on_signal)

    def _on_signal(self, number, frame):
        self._reactor.callFromThread(self._cut, signal.Signals(number).name)

    def _cut(self, name):
        if self._gateway.draining is not None and self._gateway.draining.outcome is None:
            log.info("{signal} during the drain: stopping now", signal=name)
        self._gateway.cut_drain()


def makeService(options):
    from twisted.internet import reactor

    from anyproxy.gateway.app import make_gateway_service
    from anyproxy.twistd.options import built, logging_root

    gateway = built(options, lambda: make_gateway_service(options["loaded"], reactor))
    root = logging_root(gateway, options)
    # POST /api/reload runs the same reload as SIGHUP.
    from anyproxy.twistd.reload import Reloader
    gateway.management.reloader = next(each for each in root if isinstance(each, Reloader))
    SecondSignalCuts(gateway, reactor).setServiceParent(root)
    return root
