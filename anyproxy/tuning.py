# -*- test-case-name: tests.test_tuning -*-
"""
Process and socket settings for bulk throughput, measured in benchmarks/.

Reading and writing in large chunks is the biggest gain on the data path:
fewer system calls, fewer wake-ups of the process at the other end, and
fewer Python calls per byte.  Twisted reads 64 KiB and sends at most 128 KiB
at a time by default.  Measured on one tunnel stream (benchmarks/, same
runs): 256 KiB reads with 128 KiB sends 6.4 Gbit/s; with 1 MiB sends 7.2;
384-512 KiB reads with 1 MiB sends 7.4-8.8.  1 MiB reads were slower again:
one read then takes a whole flow-control window (DEFAULT_WINDOW) and the
stream waits for credit.

Twisted uses the read size as the write high-water mark too: a transport
pauses its producer only once that much is buffered.  A user who stops
reading therefore costs one window in flight plus up to one read size
buffered before the pause; 384 KiB keeps that near 1.4 windows, where 512
KiB measured 1.55.

Large reads pay off only if glibc's malloc
keeps buffers that large on its heap: by default each allocation over 128 KiB
gets a fresh mmap and is unmapped on free, which costs more than the larger
reads save.  Raising the mmap threshold fixes that.  The trim threshold goes
up with it: otherwise freeing a large buffer at the top of the heap hands the
pages back to the kernel, and the next read faults them in again (about
20,000 page faults per GB relayed, measured on the receiving side).
"""

import ctypes
import ctypes.util
import errno
import socket

from twisted.internet import main

# Bytes read per doRead on bulk connections (user, target and tunnel sockets).
READ_SIZE = 384 * 1024
# Bytes handed to the kernel per send on the same connections, at most.
WRITE_SIZE = 1024 * 1024
# glibc: allocations below this stay on the heap and are reused.
MMAP_THRESHOLD = 4 * 1024 * 1024
# glibc: free memory at the top of the heap beyond this goes back to the kernel.
TRIM_THRESHOLD = 4 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD = -1  # from <malloc.h>
_M_MMAP_THRESHOLD = -3

_tuned = False


def tune_malloc():
    """Raise glibc's mmap and trim thresholds (no-op elsewhere); C{True} if set."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def tune_for_bulk(transport):
    """
    Make a TCP transport read up to L{READ_SIZE} and send up to
    L{WRITE_SIZE} bytes at a time, sending what it had to queue without
    joining it first (L{GatherWrites}).
    """
    transport = getattr(transport, "transport", None) or transport  # under TLS
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE
    if hasattr(transport, "SEND_LIMIT"):
        transport.SEND_LIMIT = WRITE_SIZE
        if hasattr(getattr(transport, "socket", None), "sendmsg") and has_twisted_buffer(transport):
            mix_in(transport, GatherWrites, "Gather")


# Buffers one sendmsg takes at most (Linux allows 1024).
GATHER_MAX = 256


class GatherWrites:
    """
    A Twisted TCP transport's C{doWrite} that sends the pieces waiting in its
    buffer with one C{sendmsg}.

    Twisted's C{FileDescriptor.doWrite} first joins every waiting piece into
    one bytes object, and joins again what the socket did not take with the
    pieces written since: a copy of each queued byte at least once more.  On
    a bulk stream the socket is often full, so most bytes wait: the join was
    7% of a gateway's CPU serving a download (perf;
    benchmarks/results/open-profile.md).

    Twisted's buffer fields keep their meaning (C{dataBuffer} from
    C{offset}, then the pieces of C{_tempDataBuffer}, C{_tempDataLen}
    bytes), so its C{write}, producer pausing and C{loseConnection} work as
    before; once everything is sent, Twisted's C{doWrite} does what follows
    (stop watching, resume the producer, close), after an empty send of
    its own: one system call more per drained buffer, not per write.
    """

    def doWrite(self):
        pieces = self._tempDataBuffer
        head = len(self.dataBuffer) - self.offset
        if not pieces or (head <= 0 and len(pieces) == 1):
            # Twisted sends these without a copy (a join of one piece is the
            # piece itself), and in one system call.
            return super().doWrite()
        buffers = [memoryview(self.dataBuffer)[self.offset:]] if head > 0 else []
        size, limit = head, self.SEND_LIMIT
        for piece in pieces:
            if size >= limit or len(buffers) >= GATHER_MAX:
                break
            buffers.append(piece)
            size += len(piece)
        try:
            sent = self.socket.sendmsg(buffers)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.ENOBUFS):
                return None
            return main.CONNECTION_LOST
        if head > 0:
            if sent < head:
                self.offset += sent
                return None
            sent -= head
        self.dataBuffer, self.offset = b"", 0
        done = 0
        for piece in pieces:
            if sent < len(piece):
                break
            sent -= len(piece)
            self._tempDataLen -= len(piece)
            done += 1
        if sent:
            # The piece the socket took part of becomes the head.
            self.dataBuffer, self.offset = pieces[done], sent
            self._tempDataLen -= len(self.dataBuffer)
            done += 1
        del pieces[:done]
        if pieces or self.dataBuffer:
            return None
        return super().doWrite()


_mixed_classes = {}  # (mix-in, class) -> their subclass


def mix_in(instance, mixin, prefix):
    """
    Make C{instance} one of a subclass of its class with C{mixin}'s methods
    first, made once per class: nothing is added per connection.
    """
    cls = type(instance)
    if issubclass(cls, mixin):
        return
    mixed = _mixed_classes.get((mixin, cls))
    if mixed is None:
        mixed = type(prefix + cls.__name__, (mixin, cls), {"__module__": cls.__module__})
        _mixed_classes[(mixin, cls)] = mixed
    instance.__class__ = mixed


def set_no_delay(transport):
    """Turn off Nagle's algorithm on a TCP transport (best effort)."""
    transport = getattr(transport, "transport", None) or transport
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        try:
            set_option(True)
        except OSError:
            pass  # not a TCP socket (e.g. a UNIX socket)


# Reads smaller than this re-arm TCP_QUICKACK (L{quick_acker}); larger ones
# are bulk, where the kernel acknowledges every other full segment anyway.
QUICKACK_BELOW = 64 * 1024


def quick_acker(transport):
    """
    A callable re-arming C{TCP_QUICKACK} on a TCP transport's socket, or
    C{None} where there is no such option (not Linux, not a TCP socket, a
    tunnel stream).

    Why: once a connection carries requests and answers (an upstream
    connection the HTTP proxy reuses, a kept-alive user), Linux puts its
    receiving side in "pingpong" mode and delays every ACK (up to 40 ms),
    expecting to piggyback it on an answer.  We forward what we read and
    send nothing back, so the ACK waits out the timer, and a peer with
    Nagle on that writes a response as a head and a body (Python's
    http.server, many application servers) holds the body until that ACK:
    40 ms per reused request.  Setting C{TCP_QUICKACK} after a read takes
    the socket out of pingpong mode and sends the pending ACK at once;
    the kernel turns it off again by itself, so it is re-armed after each
    read.  It costs one setsockopt (about 0.6 us), so only reads under
    L{QUICKACK_BELOW} do it: bulk transfers keep their reads free of it.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    transport = getattr(transport, "transport", None) or transport  # under TLS
    get_handle = getattr(transport, "getHandle", None)
    if option is None or get_handle is None:
        return None
    try:
        set_option = get_handle().setsockopt
        set_option(socket.IPPROTO_TCP, option, 1)
    except (OSError, AttributeError):
        return None  # not a TCP socket (e.g. a UNIX socket)
    level = socket.IPPROTO_TCP

    def rearm():
        try:
            set_option(level, option, 1)
        except OSError:
            pass  # closing: nothing left to acknowledge
    return rearm


# Twisted's FileDescriptor fields that the send paths here read and keep
# (GatherWrites, nothing_buffered and anyproxy.tunnel.tls_transport).
_BUFFER_FIELDS = ("connected", "disconnecting", "_writeDisconnected", "dataBuffer", "offset",
                  "_tempDataBuffer", "_tempDataLen")


def has_twisted_buffer(tcp):
    """Whether C{tcp} keeps its unsent bytes in Twisted's buffer fields."""
    return all(hasattr(tcp, name) for name in _BUFFER_FIELDS)


def nothing_buffered(tcp):
    """
    Whether Twisted's TCP transport C{tcp} is open for writing with nothing
    waiting in its buffer, so that bytes sent on its socket now keep their
    order (Twisted's C{FileDescriptor} attributes; tests.test_splice and
    tests.test_tls_transport check they exist).
    """
    return (tcp.connected and not tcp.disconnecting and not tcp._writeDisconnected
            and not tcp.dataBuffer and not tcp._tempDataLen)


def send_then_buffer(sock, data, buffered_write):
    """
    Send what the socket C{sock} takes of C{data} at once, and hand the rest
    (all of it after an error, which Twisted's write then meets and reports)
    to C{buffered_write}, the transport's own write.  For callers that know
    nothing is buffered before C{data} (L{nothing_buffered}), so order is kept.
    """
    try:
        sent = sock.send(data)
    except OSError:
        sent = 0
    if sent < len(data):
        # Slicing copies a cffi buffer into bytes; bytes[:] is bytes itself.
        buffered_write(data[sent:])
