"""
A finished stream leaves no reference cycles behind, on the gateway or the
client: its objects are freed by reference counting the moment it ends.

Cyclic garbage is not a leak, but the garbage collector must find it, and a
full collection walks every object of the process.  Measured in the CONNECT
benchmark before this was fixed: about 30 objects of cyclic garbage per
stream on the gateway and 20 on the client, so collections every few
hundred streams, and full ones of 30-40 ms that stalled every stream in
flight (the p99 of a CONNECT was 45 ms against 15 ms without).

Each test runs one kind of stream a few times through a gateway and a client
in this process, with real users (blocking sockets, PySocks) in threads,
and fails listing what the collector had to free, with one cycle spelled
out.
"""

import base64
import gc
import http.client
import socket

import socks
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import (
    PROXY_PASSWORD, PROXY_USER, AnswerAfterEOF, Deployment, Echo, listen_tcp, web_site)
from tests.test_e2e_tcp import recv_all, socks_connect, socks_echo
from tests.test_e2e_udp import UdpEcho, exchange, listen_udp, udp_socket
from tests.test_socks5 import unused_port

ROUNDS = 3
PROXY_CREDENTIALS = "Basic " + base64.b64encode(
    ("%s:%s" % (PROXY_USER, PROXY_PASSWORD)).encode()).decode()
AUTHORIZATION = b"Proxy-Authorization: " + PROXY_CREDENTIALS.encode()


def _ours(obj):
    """Whether C{obj} is one of the objects a stream is made of (ours, or a Twisted transport's)."""
    module = type(obj).__module__ or ""
    return module.startswith("anyproxy") or module.startswith("twisted.internet") or (
        module == "socket" and isinstance(obj, socket.socket))


def _failed_twisted_connect(obj):
    """
    A Twisted TCP client whose connect failed: Twisted leaves its C{doRead}
    and C{doWrite} bound to its own C{doConnect}, a cycle of its own that only
    a refused or timed-out dial makes (not ours to break).
    """
    return (type(obj).__module__ == "twisted.internet.tcp" and type(obj).__name__ == "Client"
            and getattr(vars(obj).get("doRead"), "__func__", None) is type(obj).doConnect)


def _describe(obj):
    kind = type(obj).__qualname__
    if kind == "method":
        return "%s.%s" % (type(obj.__self__).__qualname__, obj.__func__.__name__)
    if kind == "function":
        return "function " + obj.__qualname__
    if kind == "frame":
        return "frame " + obj.f_code.co_name
    return kind


def _cycle_through(start, garbage):
    """A shortest reference path from C{start} back to it, through C{garbage}."""
    members = {id(obj) for obj in garbage}
    came_from = {id(start): None}
    frontier = [start]
    while frontier:
        following = []
        for obj in frontier:
            for referent in gc.get_referents(obj):
                if referent is start:
                    path = [obj]  # back to start through came_from, then reversed
                    while came_from[id(path[-1])] is not None:
                        path.append(came_from[id(path[-1])])
                    return path[::-1] + [start]
                if id(referent) in members and id(referent) not in came_from:
                    came_from[id(referent)] = obj
                    following.append(referent)
        frontier = following
    return []


def http_connect_echo(http_port, echo_port):
    """CONNECT, one echo, the user closes."""
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n\r\n"
                     % (echo_port, echo_port, AUTHORIZATION))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def http_connect_target_closes(http_port, target_port):
    """CONNECT; the user half-closes, the target answers and closes first."""
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n\r\n"
                     % (target_port, target_port, AUTHORIZATION))
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\n"), answer


def http_get(http_port, web_port, close):
    """A GET forwarded to an origin; the user closes its connection after the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    try:
        headers = {"Proxy-Authorization": PROXY_CREDENTIALS}
        if close:
            headers["Connection"] = "close"
        connection.request("GET", "http://127.0.0.1:%d/" % (web_port,), headers=headers)
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"hello from the target\n")
    finally:
        connection.close()


def http_get_refused(http_port, closed_port):
    """A GET whose origin refuses the connection: the proxy answers 502."""
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    try:
        connection.request("GET", "http://127.0.0.1:%d/" % (closed_port,), headers={
            "Proxy-Authorization": PROXY_CREDENTIALS})
        response = connection.getresponse()
        response.read()
        assert response.status == 502, response.status
    finally:
        connection.close()


def socks_refused(socks_port, closed_port):
    try:
        socks_connect(socks_port, "127.0.0.1", closed_port).close()
    except socks.ProxyError:
        return
    raise AssertionError("a closed port was reached")


def udp_echo(socks_port, echo_port):
    sock = udp_socket(socks_port)
    try:
        payload, _ = exchange(sock, b"datagram", ("127.0.0.1", echo_port))
        assert payload == b"datagram"
    finally:
        sock.close()


class FinishedStreamsTests(unittest.TestCase):
    """With the HTTP proxy's defaults: upstream connections are kept for reuse."""

    timeout = 60
    http_options = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway(proxy={"http": {"options": self.http_options}})
        yield self.deployment.start_client()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.answer_port = listen_tcp(
            self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        self.web_port = listen_tcp(self, web_site()).getHost().port
        self.udp_echo_port = listen_udp(self, UdpEcho())
        self.addCleanup(gc.set_debug, 0)

    kept_open = 0

    def _streams_open(self):
        return sum(len(tunnel.mux._streams) for tunnel in
                   self.deployment.gateway.tunnel_pool.tunnels())

    @defer.inlineCallbacks
    def assert_no_cycles(self, user, *args):
        yield deferToThread(user, *args)  # first use: caches, pools, lazily built objects
        # What stays open between uses (a pooled upstream connection).
        self.kept_open = self._streams_open()
        yield self._settle()
        gc.collect()
        del gc.garbage[:]
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(ROUNDS):
                yield deferToThread(user, *args)
            yield self._settle()
            gc.collect()
            garbage = list(gc.garbage)
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        ours = [obj for obj in garbage if _ours(obj) and not _failed_twisted_connect(obj)]
        if ours:
            kinds = sorted({type(obj).__module__ + "." + type(obj).__qualname__ for obj in ours})
            cycle = next((path for path in (_cycle_through(obj, garbage) for obj in ours) if path),
                         [])
            cycle = " -> ".join(_describe(obj) for obj in cycle)
            self.fail("%d objects of %d streams left for the garbage collector: %s; for "
                      "example %s" % (len(ours), ROUNDS, ", ".join(kinds), cycle))

    @defer.inlineCallbacks
    def _settle(self):
        # Every stream ended on both sides, then a few turns for the closes.
        for _ in range(200):
            if self._streams_open() <= self.kept_open:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.05, lambda: None)

    def test_http_connect(self):
        return self.assert_no_cycles(http_connect_echo, self.deployment.http_port,
                                     self.echo_port)

    def test_http_connect_target_closes_first(self):
        return self.assert_no_cycles(http_connect_target_closes, self.deployment.http_port,
                                     self.answer_port)

    def test_http_forward(self):
        return self.assert_no_cycles(http_get, self.deployment.http_port, self.web_port, True)

    def test_http_forward_kept_alive_by_the_user(self):
        return self.assert_no_cycles(http_get, self.deployment.http_port, self.web_port, False)

    def test_socks5_connect(self):
        return self.assert_no_cycles(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                     self.echo_port, b"through socks")

    def test_http_forward_refused(self):
        return self.assert_no_cycles(http_get_refused, self.deployment.http_port, unused_port())

    def test_socks5_refused(self):
        return self.assert_no_cycles(socks_refused, self.deployment.socks_port, unused_port())

    def test_socks5_udp(self):
        return self.assert_no_cycles(udp_echo, self.deployment.socks_port, self.udp_echo_port)


class NoUpstreamReuseTests(FinishedStreamsTests):
    """The same with C{upstream_keepalive: 0}: each request has a stream of its own."""

    http_options = {"upstream_keepalive": 0}
