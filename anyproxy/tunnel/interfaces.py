# -*- test-case-name: tests.test_mux -*-
"""
The contract between a L{anyproxy.tunnel.mux.Mux} and its
L{anyproxy.tunnel.stream.Stream}s.

The mux owns the tunnel: the stream table, the frame encoding, the counters
of the whole tunnel, its backpressure and its GOAWAY.  A stream owns one
stream's state (L{anyproxy.tunnel.stream_state}), its windows and its queue,
and is the Twisted transport a protocol sees.  Each reaches the other only
through the interface below that the other provides, as
C{twisted.web._http2}'s C{H2Stream} and C{H2Connection} do: L{IStreamMux} is
what a stream may ask of its mux (send a frame, count a dropped datagram,
forget me), L{IStreamEvents} is what the mux tells a stream (each frame the
peer sent for it, the end of the tunnel, the tunnel's backpressure).
"""

from zope.interface import Attribute, Interface


class IStreamMux(Interface):
    """
    The mux as its streams see it.  Provided by L{anyproxy.tunnel.mux.Mux}.

    The C{send_*} methods write one frame for stream C{stream_id}; after the
    tunnel is lost they send nothing.  Only L{send_data} and
    L{send_datagram} count bytes: into the tunnel's totals.
    """

    name = Attribute("The tunnel's name, for the streams' addresses (C{TunnelAddress.tunnel}).")
    window = Attribute("The receive window this side grants each stream (OPEN, OPEN_OK).")
    max_window = Attribute("The bound up to which a stream's receive window may grow (auto-tuning).")
    early_data = Attribute(
        "The DATA bytes this side takes on a stream the peer opened before it answers the OPEN "
        "(its HELLO's C{early_data}).")
    paused = Attribute(
        "C{True} while the tunnel's send buffer is above its high-water mark: "
        "streams pause their producers and drop datagrams.")
    clock = Attribute(
        "An C{IReactorTime}: streams read C{clock.seconds()} for their "
        "C{created} and C{last_active} records.")

    def send_open_ok(stream_id):
        """Answer the peer's OPEN with OPEN_OK and this side's window (C{accept})."""

    def send_open_error(stream_id, reason, text):
        """Answer the peer's OPEN with OPEN_ERROR (C{reject})."""

    def send_data(stream_id, payload):
        """Send one DATA frame (at most C{MAX_DATA_PAYLOAD} bytes, within the peer's credit)."""

    def send_credit(stream_id, increment):
        """Grant the peer C{increment} more bytes of DATA."""

    def send_fin(stream_id):
        """Send FIN: no more DATA from this side."""

    def send_reset(stream_id, reason):
        """Send RESET with a L{anyproxy.errors.Reason}."""

    def send_datagram(stream_id, host, port, payload):
        """
        Send one DATAGRAM, unless the tunnel is paused or lost.

        @return: C{True} if sent; C{False} if dropped (and counted as dropped).
        """

    def datagram_dropped():
        """Count a datagram the stream dropped itself (closed, or no protocol)."""

    def stream_ended(stream):
        """
        The stream is finished (C{CLOSED}, C{RESET} or C{REFUSED}): take it
        out of the table.  DATA that still comes for its id gets one RESET.
        """


class IStreamEvents(Interface):
    """
    A stream as its mux sees it.  Provided by L{anyproxy.tunnel.stream.Stream}.

    The mux calls these for frames addressed to a stream it has in its
    table.  Each raises L{anyproxy.tunnel.stream.MuxProtocolError} when the
    frame breaks the protocol (not allowed in the stream's state, beyond a
    window); the mux then reports it and the tunnel is dropped.
    """

    stream_id = Attribute("The stream's id on the tunnel.")
    state = Attribute("The stream's state, a sentinel of L{anyproxy.tunnel.stream_state}.")

    def open_succeeded(send_window):
        """OPEN_OK for a stream this side opened: fire its opening Deferred."""

    def open_failed(reason, text):
        """OPEN_ERROR for a stream this side opened: fail its opening Deferred."""

    def data_received(payload):
        """A DATA frame's payload."""

    def datagram_received(host, port, payload):
        """
        A DATAGRAM frame.

        @return: C{True} if delivered, C{False} if dropped (the mux counts both).
        """

    def credit_received(increment):
        """A CREDIT frame: the peer grants C{increment} more bytes."""

    def fin_received():
        """A FIN frame: the peer sends no more DATA."""

    def reset_received(reason):
        """A RESET frame (a pending open fails with C{reason})."""

    def tunnel_lost():
        """The tunnel is gone: the stream is reset, or its pending open fails with NO_TUNNEL."""

    def tunnel_pause_changed():
        """The mux's C{paused} changed: pause or resume the stream's producer."""
