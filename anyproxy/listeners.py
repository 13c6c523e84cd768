# -*- test-case-name: tests.test_reload -*-
"""
Listening sockets as services: start, stop, and move to a new address
without dropping the connections already accepted (used by both programs
for their proxy, tunnel, status and metrics listeners).
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyproxy.dual_stack import server_endpoint

log = Logger()


class Listener(Service):
    """
    Listen on a Twisted server endpoint string (or C{dualstack:PORT}, see
    L{anyproxy.dual_stack}) while running.

    A listen error that happens at once (address in use, bad interface) is
    raised from C{startService}, so twistd stops with it instead of running
    without the listener.

    @ivar port: the C{IListeningPort} once listening (tests read the port
        number from it when the config asked for port 0).
    """

    port = None
    _listening = None

    def __init__(self, reactor, description, factory, what):
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self._observers = []

    def privilegedStartService(self):
        super().privilegedStartService()
        if self._listening is not None:
            return
        endpoint = server_endpoint(self._reactor, self.description)
        self._listening = endpoint.listen(self.factory)
        self._listening.addBoth(self._listen_result)
        if isinstance(self._listening.result if self._listening.called else None, Failure):
            listening, self._listening = self._listening, None
            failure = listening.result
            listening.addErrback(lambda _: None)  # handled: raised here instead
            failure.raiseException()

    def _listen_result(self, result):
        if isinstance(result, Failure):
            log.failure("{what} could not listen on {address}", result,
                        what=self.what, address=self.description)
        else:
            self.port = result
            log.info("{what} listening on {address}", what=self.what, address=result.getHost())
        observers, self._observers = self._observers, []
        for observer in observers:
            observer.callback(result)
        return result

    def when_listening(self):
        """A Deferred firing with the C{IListeningPort} (or the listen failure)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d = defer.Deferred()
        self._observers.append(d)
        return d

    def startService(self):
        self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None


def rebind(parent, old, new):
    """
    Replace listener C{old} (or nothing) under C{parent} by the not yet
    started L{Listener} C{new}: C{new} listens first, and only then is
    C{old} stopped.  Stopping a listener closes its listening socket, not
    the connections it accepted, so nobody is dropped (config reload).

    @return: a Deferred firing with C{None} once done, or with a note for
        the log when C{new} could not listen (then C{old} is kept).
    """
    if not parent.running:
        new.setServiceParent(parent)
        return remove_child(parent, old)
    try:
        new.startService()
        d = new.when_listening()
    except Exception as e:
        d = defer.fail(e)

    def listening(_):
        new.setServiceParent(parent)
        return remove_child(parent, old)

    def failed(failure):
        new.stopService()
        return "%s: cannot listen on %s (%s); %s" % (
            new.what, new.description, failure.getErrorMessage(),
            "still on %s" % (old.description,) if old is not None else "not listening")

    return d.addCallbacks(listening, failed)


def remove_child(parent, child):
    """Stop and detach C{child} from C{parent} (if it is there); a Deferred."""
    if child is None or child.parent is not parent:
        return defer.succeed(None)
    return defer.maybeDeferred(child.disownServiceParent).addCallback(lambda _: None)
