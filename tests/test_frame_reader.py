"""
L{anyproxy.tunnel.frame_reader}: the tunnel's own frames read without
Autobahn, however the reads cut them, and every other frame left to Autobahn.
"""

import struct

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from anyproxy.tunnel.frame_reader import BinaryFrameReader, FrameTooLarge
from tests.support import binary_frame



def cut(data, points):
    """C{data} in pieces, cut at the given offsets."""
    points = sorted(set(p for p in points if 0 < p < len(data)))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


class Collector:
    def __init__(self, stop_after=None):
        self.messages = []
        self.stop_after = stop_after

    def __call__(self, parts):
        self.messages.append(b"".join(parts))
        return self.stop_after is not None and len(self.messages) >= self.stop_after


class ReaderTests(unittest.TestCase):

    def test_whole_frames_in_one_read(self):
        reader, got = BinaryFrameReader(1 << 20), Collector()
        payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
        self.assertIsNone(reader.feed(b"".join(map(binary_frame, payloads)), got))
        self.assertEqual(got.messages, payloads)
        self.assertTrue(reader.between_frames)

    def test_large_frame_pieces_joined_once(self):
        reader, pieces = BinaryFrameReader(1 << 20), []
        frame = binary_frame(b"x" * 100000)
        for chunk in cut(frame, range(0, len(frame), 16384)):
            self.assertIsNone(reader.feed(chunk, pieces.append))
        self.assertEqual(len(pieces), 1)
        self.assertEqual(len(pieces[0]), 7)  # one piece per read, joined by the mux
        self.assertEqual(b"".join(pieces[0]), b"x" * 100000)

    def test_pieces_view_or_copy_the_read(self):
        """A whole frame inside a read comes out as a view of it (the mux's join is its
        only copy). A frame begun at the end of a read keeps a view of that read only
        when its start is most of the read; a short tail is copied, so that a stalled
        frame does not keep a whole large read alive."""
        frame = binary_frame(b"y" * 50000)
        reader, pieces = BinaryFrameReader(1 << 20), []
        reader.feed(binary_frame(b"whole") + frame[:40000], pieces.append)
        self.assertIsInstance(pieces[0][0], memoryview)
        self.assertIsInstance(reader._parts[0], memoryview)
        reader.feed(frame[40000:], pieces.append)
        reader, pieces = BinaryFrameReader(1 << 20), []
        reader.feed(binary_frame(b"z" * 40000) + frame[:100], pieces.append)
        self.assertIsInstance(reader._parts[0], bytes)
        reader.feed(frame[100:], pieces.append)
        self.assertEqual([b"".join(p) for p in pieces], [b"z" * 40000, b"y" * 50000])

    def test_other_frames_handed_on(self):
        """A ping, a masked frame, a text frame, a fragment: the bytes from it on are returned."""
        for foreign in (b"\x89\x00", b"\x82\x85abcd12345", b"\x81\x01a", b"\x02\x01a",
                        b"\xc2\x01a", b"\x88\x02\x03\xe8"):
            reader, got = BinaryFrameReader(1 << 20), Collector()
            rest = reader.feed(binary_frame(b"one") + foreign + binary_frame(b"two"), got)
            self.assertEqual(rest, foreign + binary_frame(b"two"))
            self.assertEqual(got.messages, [b"one"])
            self.assertTrue(reader.between_frames)

    def test_other_frame_after_a_cut_header(self):
        reader, got = BinaryFrameReader(1 << 20), Collector()
        self.assertIsNone(reader.feed(b"\x82", got))
        self.assertFalse(reader.between_frames)
        self.assertIsNone(reader.feed(b"\x7e\x00", got))  # 16-bit length, cut
        self.assertEqual(reader.feed(b"\x80" + b"z" * 128 + b"\x8a\x00", got), b"\x8a\x00")
        self.assertEqual(got.messages, [b"z" * 128])

    def test_too_large(self):
        reader = BinaryFrameReader(1000)
        self.assertRaises(FrameTooLarge, reader.feed, struct.pack("!BBH", 0x82, 126, 1001), Collector())
        reader = BinaryFrameReader(1000)
        self.assertRaises(FrameTooLarge, reader.feed,
                          struct.pack("!BBQ", 0x82, 127, 1 << 63), Collector())
        reader = BinaryFrameReader(1000)
        self.assertIsNone(reader.feed(struct.pack("!BBH", 0x82, 126, 1000), Collector()))

    def test_stop_leaves_the_rest(self):
        """When the receiver stops it (the connection closes), the rest is returned unread."""
        reader, got = BinaryFrameReader(1 << 20), Collector(stop_after=1)
        rest = reader.feed(binary_frame(b"one") + binary_frame(b"two"), got)
        self.assertEqual(got.messages, [b"one"])
        self.assertEqual(rest, binary_frame(b"two"))
        reader, got = BinaryFrameReader(1 << 20), Collector(stop_after=1)
        frame = binary_frame(b"one")
        self.assertIsNone(reader.feed(frame[:3], got))
        self.assertEqual(reader.feed(frame[3:], got), b"")

    @settings(max_examples=300, deadline=None)
    @given(payloads=st.lists(st.binary(max_size=300) | st.sampled_from([b"p" * 70000]), max_size=8),
           foreign=st.none() | st.sampled_from([b"\x89\x00", b"\x8a\x02hi", b"\x82\xfe", b"\x01\x00"]),
           points=st.lists(st.integers(min_value=0, max_value=71000), max_size=12))
    def test_any_cut(self, payloads, foreign, points):
        """However the reads cut the stream, the messages and the handed-on rest are the same."""
        ours = b"".join(map(binary_frame, payloads))
        stream = ours + (foreign or b"") + binary_frame(b"after")
        reader, got, rest = BinaryFrameReader(1 << 20), Collector(), []
        for chunk in cut(stream, points):
            if rest:
                rest.append(chunk)  # past the foreign frame: another parser's bytes
                continue
            left = reader.feed(chunk, got)
            if left is not None:
                rest.append(left)
        if foreign is None:
            self.assertEqual(got.messages, payloads + [b"after"])
            self.assertEqual(rest, [])
        else:
            self.assertEqual(got.messages, payloads)
            self.assertEqual(b"".join(rest), foreign + binary_frame(b"after"))
        self.assertTrue(reader.between_frames)
