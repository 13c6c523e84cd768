# -*- test-case-name: tests.test_frame_reader -*-
"""
The tunnel's receive path for the one kind of WebSocket frame both AnyProxy
ends send once the tunnel is open: final, binary, unmasked, no extension bits
(C{0x82}, then a 7-, 16- or 64-bit length).  Each carries one mux message.

Autobahn's general frame parser costs about 10 us per frame in Python (state
machine, masker, per-frame handlers), which was a tenth of a new stream's CPU
and most of a small datagram's.  L{BinaryFrameReader} reads these frames
without it: bytes in, whole messages out (as the list of their pieces, which
the mux joins once; a piece cut from a larger read is a memoryview of it, so
the payload is copied only by that join).  It is sans-I/O and knows nothing of Autobahn.

Any other frame (ping, pong, close, masked, fragmented, reserved bits) stops
it: L{BinaryFrameReader.feed} returns the bytes from that frame on, which the
binding hands to Autobahn, and the binding keeps handing later bytes to
Autobahn until Autobahn is between frames again.
"""

import struct

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")

_BINARY_FINAL = 0x82  # FIN, no RSV bits, opcode 2


class FrameTooLarge(Exception):
    """A frame longer than the reader's bound: the peer broke the protocol."""

    def __init__(self, length, bound):
        super().__init__("WebSocket frame of %d bytes, over the bound of %d" % (length, bound))
        self.length = length


class BinaryFrameReader:
    """
    Splits a byte stream into the payloads of C{0x82} frames.

    @ivar max_payload: the longest payload accepted; longer is L{FrameTooLarge}.
    """

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self._header = b""   # the start of a frame header cut by a read
        self._parts = None   # the current frame's payload pieces, once its header is in
        self._missing = 0    # payload bytes the current frame still lacks

    @property
    def between_frames(self):
        """True when no frame is partly read: other bytes may be given to another parser."""
        return self._parts is None and not self._header

    def feed(self, data, deliver):
        """
        Read C{data}, calling C{deliver(pieces)} with the payload pieces of
        each whole frame, in order.  A true answer from C{deliver} stops the
        reading (the connection is closing) before the next frame.

        @return: C{None} when every byte was read (a frame may be partly in),
            else the bytes from the first frame this reader does not take or
            was stopped before (possibly empty), for another parser.
        @raise FrameTooLarge: a frame header announced more than
            C{max_payload} bytes.
        """
        view = memoryview(data)
        if self._parts is not None:
            missing = self._missing
            if len(data) < missing:
                self._parts.append(data)
                self._missing = missing - len(data)
                return None
            parts, self._parts = self._parts, None
            parts.append(view[:missing] if len(data) > missing else data)
            offset = missing
            if deliver(parts):
                return data[offset:]
        elif self._header:
            data = self._header + data
            view = memoryview(data)
            self._header = b""
            offset = 0
        else:
            offset = 0
        end = len(data)
        max_payload = self.max_payload
        while offset < end:
            if data[offset] != _BINARY_FINAL:
                return data[offset:] if offset else data
            if offset + 2 > end:
                self._header = data[offset:]
                return None
            length = data[offset + 1]
            if length < 126:
                start = offset + 2
            elif length == 126:
                start = offset + 4
                if start > end:
                    self._header = data[offset:]
                    return None
                length = _LEN16.unpack_from(data, offset + 2)[0]
            elif length == 127:
                start = offset + 10
                if start > end:
                    self._header = data[offset:]
                    return None
                length = _LEN64.unpack_from(data, offset + 2)[0]
            else:  # the mask bit: masked frames are Autobahn's
                return data[offset:] if offset else data
            if length > max_payload:
                raise FrameTooLarge(length, max_payload)
            stop = start + length
            if stop <= end:
                offset = stop
                if deliver([view[start:stop]]):
                    return data[offset:]
            else:
                # A view keeps the whole read alive until the frame is in:
                # worth it only when the tail is most of the read.
                self._parts = [view[start:] if 2 * (end - start) >= end else data[start:]]
                self._missing = stop - end
                return None
        return None
