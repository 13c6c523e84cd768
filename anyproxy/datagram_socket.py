# -*- test-case-name: tests.test_datagram_socket -*-
"""
Sending datagrams on a Twisted UDP port without its per-call address checks.

C{twisted.internet.udp.Port.write} checks the address of every datagram
(C{isIPAddress}, C{isIPv6Address}: three C{inet_pton} calls and their
exceptions), a fifth of the Python time of a datagram relayed by the SOCKS5
relay and the client's association (benchmarks/results/udp-profile.md).
Both already hold the address as a checked IP literal of the socket's
family, so they send on the socket itself.
"""

import errno
import socket


def direct_sender(port):
    """
    A C{send(data, (ip, port_number))} for the Twisted UDP C{port}.

    It is the C{sendto} of the port's socket when C{port.getHandle()} is a
    socket, else C{port.write} (a test's fake port).  The caller passes an
    IP literal of the socket's family; nothing checks it.  Errors are
    C{sendto}'s C{OSError}s (C{EAGAIN}: the socket buffer is full,
    C{EMSGSIZE}, ...); see L{refused_earlier} for C{ECONNREFUSED}.
    """
    get_handle = getattr(port, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if isinstance(handle, socket.socket):
        return handle.sendto
    return port.write


def refused_earlier(exception):
    """
    Whether C{exception}, raised by a sender of L{direct_sender}, is
    C{ECONNREFUSED}: an ICMP port unreachable that an earlier datagram drew,
    which some platforms report on a later send.  C{Port.write} ignores it
    (the datagram at hand is not the one refused), and so do its callers.
    """
    return isinstance(exception, OSError) and exception.errno == errno.ECONNREFUSED
