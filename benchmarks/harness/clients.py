"""
Small clients the measurements and the start-up checks use: SOCKS5 (blocking
and asyncio; no authentication, every listener here is loopback-only), an
HTTP proxy request, and a UDP socket through a SOCKS5 UDP association.
"""

import asyncio
import contextlib
import select
import socket
import struct

from harness import LOOPBACK, MiB, BenchError

UDP_BUFFER = 4 * MiB  # asked for our UDP socket's buffers; the kernel may grant less


def socks_request(host, port, command=1):
    return b"\x05" + bytes([command]) + b"\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError("SOCKS5 proxy closed the connection")
        data += chunk
    return data


def _reply_rest(atyp, first):
    if atyp == 1:
        return 4 + 2
    if atyp == 4:
        return 16 + 2
    if atyp == 3:
        return first + 1 + 2  # length byte already read as `first`
    raise BenchError("bad SOCKS5 reply address type %d" % atyp)


def socks_connect(proxy_port, host, port, timeout=10.0, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        _socks_command(sock, proxy_port, socks_request(host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _socks_command(sock, proxy_port, request):
    """Connect C{sock} to the SOCKS5 proxy (no authentication), send C{request}; the reply's address."""
    sock.connect((LOOPBACK, proxy_port))
    sock.sendall(b"\x05\x01\x00")
    if recv_exact(sock, 2) != b"\x05\x00":
        raise BenchError("SOCKS5 method refused")
    sock.sendall(request)
    return _socks_reply(sock)


def _socks_reply(sock):
    """Read a SOCKS5 reply; return its BND.ADDR and BND.PORT."""
    head = recv_exact(sock, 5)
    if head[1] != 0:
        raise BenchError("SOCKS5 reply 0x%02x" % head[1])
    rest = recv_exact(sock, _reply_rest(head[3], head[4]) - 1)
    if head[3] == 1:
        host = socket.inet_ntoa(head[4:5] + rest[:3])
    elif head[3] == 4:
        host = socket.inet_ntop(socket.AF_INET6, head[4:5] + rest[:15])
    else:
        host = rest[:head[4]].decode("ascii", "replace")
    return host, struct.unpack("!H", rest[-2:])[0]


def socks_udp_associate(proxy_port, local, timeout=10.0):
    """
    SOCKS5 UDP ASSOCIATE for the UDP socket bound to C{local}: returns the
    control connection (the association lives as long as it stays open) and
    the relay's address.
    """
    control = socket.socket()
    control.settimeout(timeout)
    try:
        host, port = _socks_command(control, proxy_port, socks_request(local[0], local[1], command=3))
    except BaseException:
        control.close()
        raise
    return control, (LOOPBACK if host in ("0.0.0.0", "::") else host, port)


async def socks_open(proxy_port, host, port):
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy_port)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise BenchError("SOCKS5 method refused")
        writer.write(socks_request(host, port))
        head = await reader.readexactly(5)
        if head[1] != 0:
            raise BenchError("SOCKS5 reply 0x%02x" % head[1])
        await reader.readexactly(_reply_rest(head[3], head[4]) - 1)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def echo_check(proxy_port, echo_port):
    with socks_connect(proxy_port, LOOPBACK, echo_port) as sock:
        sock.sendall(b"ping\n")
        if recv_exact(sock, 5) != b"ping\n":
            raise BenchError("echo answered wrongly")


def http_proxy_check(proxy_port, http_port):
    with socket.create_connection((LOOPBACK, proxy_port), 10) as sock:
        sock.sendall(b"GET http://%s:%d/ HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                     % (LOOPBACK.encode(), http_port, LOOPBACK.encode(), http_port))
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise BenchError("HTTP proxy answered %r" % answer[:60])


class UdpPath:
    """
    A UDP socket and the way to the UDP echo: straight to it (C{proxy_port}
    None), or through a SOCKS5 UDP association, every datagram then carrying
    the RFC 1928 header (the relay answers with the same header, naming the
    echo as the source).
    """

    def __init__(self, echo_port, proxy_port=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control = None
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            self.sock.bind((LOOPBACK, 0))
            if proxy_port is None:
                self.address, self.header = (LOOPBACK, echo_port), b""
            else:
                self.control, self.address = socks_udp_associate(proxy_port, self.sock.getsockname())
                self.header = b"\x00\x00\x00\x01" + socket.inet_aton(LOOPBACK) + struct.pack("!H", echo_port)
        except BaseException:
            self.close()
            raise

    def alive(self):
        """False once the proxy has closed the association's control connection."""
        if self.control is None:
            return True
        if not select.select([self.control], [], [], 0)[0]:
            return True
        try:
            return self.control.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def probe(self, timeout=0.5):
        self.sock.settimeout(timeout)
        self.sock.sendto(self.header + b"probe", self.address)
        data = self.sock.recv(65536)
        if data != self.header + b"probe":
            raise BenchError("UDP echo answered %r" % data[:60])

    def close(self):
        self.sock.close()
        if self.control is not None:
            self.control.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_udp_path(echo_port, proxy_port=None):
    """A L{UdpPath} whose first datagram has come back."""
    path = UdpPath(echo_port, proxy_port)
    try:
        path.probe()
    except BaseException:
        path.close()
        raise
    return path
