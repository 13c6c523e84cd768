# -*- test-case-name: tests.test_tls_transport -*-
"""
The tunnel's TLS connection under Twisted: its bytes reach the socket
without the reactor turns Twisted spends on small writes, and an idle
connection gives back the memory its TLS buffers grew to.

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

  - L{release_buffers}: Twisted's TLS runs OpenSSL over two memory BIOs,
    whose buffers only ever grow: to the handshake's flights (about 5 KiB a
    connection), and on a tunnel that carried bulk data to a whole TCP read
    (384 KiB, anyproxy/tuning.py): measured, 556 KiB a connection after one
    such read each way, 537 KiB of it given back by fresh BIOs, so that
    2,000 tunnels that once carried a download would otherwise hold about
    1 GB.  A quiet connection gets two fresh, empty BIOs, with
    any bytes still in the old ones moved over first (the binding does it
    once a tunnel is open and when it is quiet after bulk data:
    L{anyproxy.tunnel.websocket}).

  - L{batch_records}: Twisted's TLS layer moves bulk data a TLS record
    (16 KiB) at a time through pyOpenSSL's Python wrappers: for each record
    it slices a copy of the plaintext, encrypts it, reads the ciphertext out
    into a new buffer and writes it to the socket (a send per record), and
    on the way in decrypts one record per call and hands each up through
    every protocol layer above.  On a gateway relaying a fleet stream (one
    connection's records in, another's out) that was about two thirds of
    its CPU; the encryption itself is a tenth (measured, perf).  Here a
    write is encrypted from a view of the caller's bytes in 32 KiB steps,
    each step's ciphertext leaving in one socket send, and a read decrypts
    every whole record in the receive BIO into one buffer, handed up once.
    A write that OpenSSL does not take (it wants a read first, or failed)
    is left to Twisted's own method, which meets the same answer; a read's
    close_notify or error is raised by pyOpenSSL and handled as Twisted
    does.  The turn's gathered writes are encrypted by a turn-end call
    (L{anyproxy.reactor_dispatch.turn_end_clock}) rather than a reactor
    timer, where the reactor is patched for it.

Twisted and pyOpenSSL internals relied on, checked by
tests/test_tls_transport.py: the TLS protocol's C{_aggregator} with its
C{_buffer} and C{_clock}, C{TLSMemoryBIOProtocol.write} (the write without the
gathering) and C{_tlsConnection}; the TCP transport's C{socket},
C{connected}, C{disconnecting}, C{_writeDisconnected}, C{dataBuffer} and
C{_tempDataLen}; the TLS protocol's C{_write}, C{_flushSendBIO},
C{_flushReceiveBIO}, C{_handshakeDone}, C{_lostTLSConnection},
C{_aborted}, C{_shutdownTLS} and C{_tlsShutdownFinished}; pyOpenSSL's
C{Connection._ssl}, C{_into_ssl}, C{_from_ssl} and C{_raise_ssl_error}
and its binding's C{BIO_new}, C{BIO_s_mem}, C{BIO_read},
C{BIO_write}, C{SSL_set_bio}, C{SSL_read}, C{SSL_write},
C{SSL_get_error} and C{BIO_get_mem_data}.  Where one is missing, the
functions change nothing.
"""

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOProtocol

from anyproxy.reactor_dispatch import turn_end_clock
from anyproxy.tuning import has_twisted_buffer, mix_in, nothing_buffered, send_then_buffer


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


class _SendAtOnce:
    """
    The methods L{send_ciphertext_at_once} gives a TCP transport: its
    write sends at once when nothing waits in its buffer.
    """

    def write(self, data):
        # data: bytes, or a cffi buffer that is reused once this returns
        # (takes_views): only what must wait is copied, by slicing it.
        if data and nothing_buffered(self):
            send_then_buffer(self.socket, data, self._buffered_write)
            return
        self._buffered_write(data[:])

    write.takes_views = True

    def _buffered_write(self, data):
        super().write(data)


def send_ciphertext_at_once(transport):
    """
    Make the TLS layer under C{transport} hand its encrypted bytes straight
    to the socket when nothing is waiting in the TCP transport's buffer.

    The TCP transport becomes an instance of a subclass of its class with
    L{_SendAtOnce}'s write, made once per class: nothing is added per
    connection.

    @return: whether it was installed.
    """
    layers = tls_layers(transport)
    if layers is None:
        return False
    tls, tcp = layers
    if not has_twisted_buffer(tcp):
        return False
    mix_in(tcp, _SendAtOnce, "SendAtOnce")
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


_MOVE_CHUNK = 16 * 1024


def _move_pending(old, new, chunk):
    """Move the bytes waiting in memory BIO C{old} to C{new}; False on a failed write."""
    while True:
        count = _lib.BIO_read(old, chunk, _MOVE_CHUNK)
        if count <= 0:
            return True
        if _lib.BIO_write(new, chunk, count) != count:
            return False


def release_buffers(transport):
    """
    Give the TLS connection under C{transport} two fresh memory BIOs, so
    that the buffers the old ones grew to are freed.  Call it when the
    connection is idle, from a timer rather than from inside its I/O.

    @return: whether the BIOs were replaced.
    """
    layers = tls_layers(transport)
    connection = getattr(layers[0], "_tlsConnection", None) if layers is not None else None
    ssl = getattr(connection, "_ssl", None)
    old_in, old_out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    if ssl is None or old_in is None or old_out is None:
        return False
    new_in, new_out = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
    if new_in == _ffi.NULL or new_out == _ffi.NULL:
        for bio in (new_in, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    chunk = _ffi.new("char[]", _MOVE_CHUNK)
    if not (_move_pending(old_in, new_in, chunk) and _move_pending(old_out, new_out, chunk)):
        # Out of memory, so the bytes read from the old BIOs could not all be
        # written to the new ones; this connection cannot go on.  (Not seen
        # in practice: a memory BIO's write fails only when malloc does.)
        _lib.BIO_free(new_in)
        _lib.BIO_free(new_out)
        raise MemoryError("TLS memory BIO")
    # The SSL object owns its BIOs: SSL_set_bio frees the old pair.
    _lib.SSL_set_bio(ssl, new_in, new_out)
    connection._into_ssl, connection._from_ssl = new_in, new_out
    return True


# Plaintext encrypted per step of a write: its ciphertext is one socket send.
# Each step's bytes are copied into the send BIO (which OpenSSL first zeroes)
# and out again, so a step small enough for the CPU's first-level cache costs
# less per byte: two records.  Measured on a SOCKS5 download, CPU per GiB of
# the sending client: 0.86-0.90 s with 32 KiB steps, 0.89-1.02 s with 64 KiB,
# 0.96-0.98 s with 16 KiB (a send per record); the runs are in
# benchmarks/results/open-profile.md.
WRITE_STEP = 32 * 1024
# Plaintext gathered per delivery upward: more than a TCP read holds
# (anyproxy/tuning.py), so a read is one delivery.
_READ_BUFFER = 512 * 1024

_TLS_INTERNALS = ("_write", "_flushSendBIO", "_flushReceiveBIO", "_handshakeDone",
                  "_lostTLSConnection", "_aborted", "_tlsConnection", "_shutdownTLS",
                  "_tlsShutdownFinished")
_BINDING = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ",
            "BIO_get_mem_data", "BIO_read")


# The process's buffers for decrypted and encrypted bytes.  Their contents
# are copied out before anything else runs, so one pair serves every
# connection; pages no read or write has reached cost no memory.
_plaintext = _ffi.new("char[]", _READ_BUFFER)
_ciphertext = _ffi.new("char[]", 2 * WRITE_STEP)
_pending = _ffi.new("char **")


class _BatchedRecords:
    """
    The methods L{batch_records} gives a connection's TLS protocol in place
    of C{TLSMemoryBIOProtocol}'s.  Until the handshake is done, and for a
    write OpenSSL does not take, they call Twisted's own; a read's
    close_notify or error is handled as Twisted's does.
    """

    def _write(self, data):
        self._write_parts((data,))

    def write_joined(self, head, body):
        """
        Write C{head + body} (a frame's header and its payload) without
        joining them, unless writes of this turn wait in Twisted's
        aggregator: then joined behind them, in order.
        """
        if getattr(getattr(self, "_aggregator", None), "_buffer", True):
            self.write(b"".join((head, body)))
        elif not self.disconnecting or self._producer is not None:
            self._write_parts((head, body))

    def _write_parts(self, parts):
        if self._lostTLSConnection or not self._handshakeDone:
            super()._write(b"".join(parts))
            return
        ssl = self._tlsConnection._ssl
        for index, data in enumerate(parts):
            size = len(data)
            done = 0
            with _ffi.from_buffer(data) as start:
                while done < size:
                    stop = min(size, done + WRITE_STEP)
                    whole_step = stop - done == WRITE_STEP
                    while done < stop:
                        written = _lib.SSL_write(ssl, start + done, stop - done)
                        if written <= 0:
                            break
                        done += written
                    if done < stop:
                        break
                    if whole_step:
                        self._flushSendBIO()  # its own send; a short head waits for the body
            if done < size:
                # OpenSSL wants a read first, or failed: Twisted's write
                # meets the same answer and buffers the rest or closes.
                self._flushSendBIO()
                super()._write(b"".join([data[done:]] + list(parts[index + 1:])))
                return
        self._flushSendBIO()

    def _flushSendBIO(self):
        # All the ciphertext waiting, in one write to the TCP transport:
        # from the scratch buffer itself when that write copies only what
        # it cannot send at once (send_ciphertext_at_once).
        out = self._tlsConnection._from_ssl  # release_buffers may replace it
        pending = _lib.BIO_get_mem_data(out, _pending)
        if pending <= 0:
            return
        buffer = _ciphertext
        if pending > len(buffer):
            buffer = _ffi.new("char[]", pending)
        count = _lib.BIO_read(out, buffer, pending)
        if count > 0:
            write = self.transport.write
            ciphertext = _ffi.buffer(buffer, count)
            write(ciphertext if getattr(write, "takes_views", False) else ciphertext[:])

    def _flushReceiveBIO(self):
        connection = self._tlsConnection
        ssl = connection._ssl
        buffer, size = _plaintext, _READ_BUFFER
        filled = 0
        problem = None
        while not self._lostTLSConnection:
            count = _lib.SSL_read(ssl, buffer + filled, size - filled)
            if count <= 0:
                if _lib.SSL_get_error(ssl, count) != _lib.SSL_ERROR_WANT_READ:
                    # The peer's close_notify, or a fatal error.  Turned into
                    # pyOpenSSL's exception now, which empties this thread's
                    # OpenSSL error queue before anything else runs.
                    try:
                        connection._raise_ssl_error(ssl, count)
                    except SSL.Error as e:
                        problem = e
                break
            filled += count
            if filled == size:
                if self._aborted:
                    return
                ProtocolWrapper.dataReceived(self, _ffi.buffer(buffer, filled)[:])
                filled = 0
        if filled and not self._aborted:
            ProtocolWrapper.dataReceived(self, _ffi.buffer(buffer, filled)[:])
        if problem is not None and not self._lostTLSConnection:
            # As TLSMemoryBIOProtocol._flushReceiveBIO handles them.
            if isinstance(problem, SSL.ZeroReturnError):
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            else:
                self._tlsShutdownFinished(Failure(problem))
        # The records may have asked for an answer (a key update).
        self._flushSendBIO()


def batch_records(transport):
    """
    Make the TLS layer under C{transport} encrypt and decrypt in batches of
    records (see the module docstring).  Call it once the TLS handshake is
    done, or any time before: until then Twisted's methods run.

    The connection's TLS protocol becomes an instance of a subclass of its
    class with L{_BatchedRecords}' methods, made once per class: nothing is
    added per connection (a gateway holds thousands of tunnels).

    @return: whether it was installed.
    """
    layers = tls_layers(transport)
    if layers is None:
        return False
    tls = layers[0]
    connection = getattr(tls, "_tlsConnection", None)
    if (getattr(connection, "_ssl", None) is None or not hasattr(connection, "_from_ssl")
            or not hasattr(connection, "_raise_ssl_error")
            or not all(hasattr(tls, name) for name in _TLS_INTERNALS)
            or not all(hasattr(_lib, name) for name in _BINDING)):
        return False
    mix_in(tls, _BatchedRecords, "Batched")
    aggregator = getattr(tls, "_aggregator", None)
    if hasattr(aggregator, "_clock"):
        # The turn's writes gathered by a turn-end call, not a reactor timer.
        aggregator._clock = turn_end_clock(aggregator._clock)
    return True
