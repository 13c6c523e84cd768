# -*- test-case-name: tests.test_endpoint -*-
"""
L{connect_protocol}: Twisted's C{connectProtocol} for the data path.

C{twisted.internet.endpoints.connectProtocol} defines a factory class on
every call.  Creating a class costs microseconds and, since a class refers
to itself, leaves a reference cycle for the garbage collector: at thousands
of new streams a second that was a few percent of the gateway's CPU.  One
factory class, instantiated per connection, does the same job.
"""

from twisted.internet.protocol import Factory


class OneProtocolFactory(Factory):
    """A factory whose only protocol is the one it was given."""

    noisy = False

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def connect_protocol(endpoint, protocol):
    """
    Connect C{protocol} (an instance) through C{endpoint}.

    @return: the Deferred of C{endpoint.connect}, firing with C{protocol}.
    """
    return endpoint.connect(OneProtocolFactory(protocol))
