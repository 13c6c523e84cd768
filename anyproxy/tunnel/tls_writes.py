# -*- test-case-name: tests.test_tls_writes -*-
"""
How the tunnel's bytes reach its socket under Twisted's TLS, without the
reactor turns Twisted spends on small writes.

Twisted sends a write to a TLS connection two reactor turns later: its TLS
layer gathers the writes of one turn and encrypts them on the next
(C{BufferingTLSTransport}'s aggregation), and the TCP transport then only
asks the reactor to watch the socket for writing (two C{epoll_ctl} calls,
one more turn and its dispatch) before it sends.  For an idle tunnel's pong,
or the first frames of a new stream, that is most of the work.

  - L{send_ciphertext_at_once}: the encrypted bytes go to the socket at once
    when nothing is buffered before them; whatever the socket does not take
    (or any error, which Twisted's own write then meets) goes Twisted's way,
    so ordering, backpressure and close stay Twisted's.
  - L{write_alone}: a small frame written while the TLS layer holds nothing
    of this turn is encrypted at once instead of on the next turn (the
    idle tunnel's pong).  Frames of a busy turn are still gathered.

Twisted internals relied on, checked by tests/test_tls_writes.py: the TLS
protocol's C{_aggregator} and its C{_buffer}, C{TLSMemoryBIOProtocol.write}
(the write without the gathering), and the TCP transport's C{socket},
C{connected}, C{disconnecting}, C{_writeDisconnected}, C{dataBuffer} and
C{_tempDataLen}.  Where one is missing, the functions change nothing.
"""

from twisted.protocols.tls import TLSMemoryBIOProtocol

from anyproxy.tuning import send_then_buffer


def tls_layers(transport):
    """
    C{(tls, tcp)}: a connection's C{transport} when it is Twisted's TLS
    protocol (C{TLSMemoryBIOFactory}, as the gateway's listener, the peer
    links and C{wrapClientTLS} build it) and the TCP transport under it; or
    C{None} for anything else (TLS started on the TCP transport itself, say).
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    tcp = getattr(transport, "transport", None)
    if getattr(tcp, "socket", None) is None:
        return None
    return transport, tcp


def send_ciphertext_at_once(transport):
    """
    Make the TLS layer under C{transport} hand its encrypted bytes straight
    to the socket when nothing is waiting in the TCP transport's buffer.

    @return: whether it was installed.
    """
    layers = tls_layers(transport)
    if layers is None:
        return False
    tls, tcp = layers
    buffered_write = tcp.write
    for name in ("connected", "disconnecting", "_writeDisconnected", "dataBuffer", "_tempDataLen"):
        if not hasattr(tcp, name):
            return False

    def write(data):
        if (tcp.connected and not tcp.disconnecting and not tcp._writeDisconnected
                and not tcp.dataBuffer and not tcp._tempDataLen and data):
            send_then_buffer(tcp.socket, data, buffered_write)
            return
        buffered_write(data)

    # The TLS protocol writes its records to its transport's write: the
    # instance attribute takes its place for this connection only.
    tcp.write = write
    return True


def write_alone(transport, data):
    """
    Write C{data} (a small whole frame) to C{transport}, a TLS connection,
    encrypting it at once when the TLS layer gathers nothing else this turn.
    """
    layers = tls_layers(transport)
    aggregator = getattr(layers[0], "_aggregator", None) if layers is not None else None
    if aggregator is None or getattr(aggregator, "_buffer", True) or transport.disconnecting:
        transport.write(data)
        return
    TLSMemoryBIOProtocol.write(layers[0], data)
