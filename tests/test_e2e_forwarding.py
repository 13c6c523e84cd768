"""
End to end on loopback: port forwarding (C{client.open_ports}).  The gateway
listens on ports from its C{open_ports_allowed} range and carries each
connection or datagram through the asking client's tunnel to a target that
the client names (and resolves).
"""

import errno
import hashlib
import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from anyproxy.config.load import load_config
from tests.ports import free_ports
from tests.support import AnswerAfterEOF, Deployment, Echo, blob, listen_tcp
from tests.test_dual_stack import NO_IPV6_LOOPBACK
from tests.test_e2e_tcp import socks_echo

MB = 1024 * 1024


class UdpEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"echo:" + data, addr)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll C{predicate} until true; fail the test after C{timeout} seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for %s" % (what,))
        yield sleep(0.02)


def recv_all(sock):
    chunks = []
    while True:
        data = sock.recv(256 * 1024)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def tcp_exchange(port, payload, timeout=10):
    """Connect to 127.0.0.1:port, send C{payload}, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def tcp_echo_then_half_close(port, timeout=10):
    """An interactive echo round trip, then half-close: the echo finishes and closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"hello")
        first = b""
        while len(first) < 5:
            first += sock.recv(5 - len(first))
        sock.sendall(b" world")
        sock.shutdown(socket.SHUT_WR)
        return first, recv_all(sock)


def tcp_refused(port):
    """Whether nothing listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    return False


def udp_exchange(port, payloads, timeout=10):
    """From one socket, send each payload to 127.0.0.1:port; the replies and their source."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind(("127.0.0.1", 0))
        answers = []
        for payload in payloads:
            sock.sendto(payload, ("127.0.0.1", port))
            answers.append(sock.recvfrom(70000))
        return answers


def open_port(remote_port, local_port, protocol="tcp", local_host="127.0.0.1"):
    return {"remote_port": remote_port, "local_host": local_host, "local_port": local_port,
            "protocol": protocol}


class _Base(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # The range spans the four lowest of five free ports; the fifth is outside it.
        *self.ports, self.outside = free_ports(5)
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway(
            gateway={"open_ports_allowed": ["%d-%d" % (self.ports[0], self.ports[-1])]})
        self.forwarding = self.deployment.gateway.port_forwarding
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def start_client(self, open_ports, client_id="client-1", wait=True):
        client = yield self.deployment.start_client(wait=False, client={
            "client_id": client_id, "open_ports": open_ports})
        factory = list(client.factories.values())[0]
        if wait:
            yield wait_until(lambda: factory.open_ports_answer is not None,
                             what="the gateway's open_ports answer")
        return client, factory

    def logged(self, level_name, text):
        return [e for e in self.events
                if e.get("log_level") is not None and e["log_level"].name == level_name
                and text in (e.get("log_format") or "") + repr(e)]


class TcpForwardingTests(_Base):
    """A TCP service named by the client is reached through the gateway's port."""

    @defer.inlineCallbacks
    def test_bytes_both_ways_and_half_close(self):
        """Megabytes go up, the user half-closes, and the target's answer comes back."""
        target = listen_tcp(self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        remote = self.ports[0]
        _, factory = yield self.start_client(
            [open_port(remote, target, local_host="target.test")])
        self.assertEqual(factory.open_ports_answer,
                         [{"remote_port": remote, "protocol": "tcp", "ok": True, "error": ""}])
        payload = blob(3 * MB + 17)
        got = yield deferToThread(tcp_exchange, remote, payload)
        self.assertEqual(got, b"%d %s\n" % (len(payload),
                                            hashlib.sha256(payload).hexdigest().encode()))
        # The client resolved the name: the gateway never saw it as an address.
        self.assertIn("target.test", self.deployment.resolver.asked)

    @defer.inlineCallbacks
    def test_interactive_echo(self):
        """An echo answers while the connection is open; after a half-close it finishes and closes."""
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        remote = self.ports[1]
        yield self.start_client([open_port(remote, target)])
        first, rest = yield deferToThread(tcp_echo_then_half_close, remote)
        self.assertEqual((first, rest), (b"hello", b" world"))
        yield wait_until(lambda: not self.forwarding.port_for(remote).connections,
                         what="the forwarded connection to close")

    @defer.inlineCallbacks
    def test_target_refused_at_client(self):
        """A forward to a closed port at the client resets the user's connection; the port stays."""
        closed = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        target = closed.getHost().port
        yield closed.stopListening()
        remote = self.ports[0]
        yield self.start_client([open_port(remote, target)])

        def attempt():
            try:
                return tcp_exchange(remote, b"x")
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    return "reset"  # the reset arrived before our shutdown
                raise

        self.assertEqual((yield deferToThread(attempt)), "reset")
        self.assertIsNotNone(self.forwarding.port_for(remote))


class UdpForwardingTests(_Base):
    """Datagrams reach a UDP service through the gateway's port, one association per source."""

    @defer.inlineCallbacks
    def test_udp_echo(self):
        """Two sources each get their own replies, from the forwarded port."""
        echo = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(echo.stopListening)
        remote = self.ports[2]
        _, factory = yield self.start_client(
            [open_port(remote, echo.getHost().port, protocol="udp")])
        self.assertEqual(factory.open_ports_answer,
                         [{"remote_port": remote, "protocol": "udp", "ok": True, "error": ""}])
        payloads = [b"a" * 1, b"b" * 1000, b"c" * 60000]
        first, second = yield defer.gatherResults([
            deferToThread(udp_exchange, remote, payloads),
            deferToThread(udp_exchange, remote, [b"other source"])])
        self.assertEqual(first, [(b"echo:" + p, ("127.0.0.1", remote)) for p in payloads])
        self.assertEqual(second, [(b"echo:other source", ("127.0.0.1", remote))])
        self.assertEqual(len(self.forwarding.port_for(remote, "udp").udp.sessions), 2)


class RefusalTests(_Base):
    """Ports outside the range or taken are refused clearly; the client keeps serving."""

    @defer.inlineCallbacks
    def test_outside_allowed_range(self):
        """A port outside open_ports_allowed is refused; the allowed one and the proxy still work."""
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        outside = self.outside
        allowed = self.ports[0]
        _, factory = yield self.start_client([open_port(outside, target),
                                              open_port(allowed, target)])
        refused, ok = factory.open_ports_answer
        self.assertEqual((refused["remote_port"], refused["ok"]), (outside, False))
        self.assertIn("open_ports_allowed", refused["error"])
        self.assertTrue(ok["ok"])
        self.assertTrue((yield deferToThread(tcp_refused, outside)))
        self.assertEqual((yield deferToThread(tcp_exchange, allowed, b"still")), b"still")
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1", target,
                                  b"proxy too")
        self.assertEqual(got, b"proxy too")
        self.assertTrue(self.logged("warn", "refused"), "no warning logged")

    @defer.inlineCallbacks
    def test_many_refused(self):
        """
        130 ports asked, none allowed, each refused with its reason: the
        answer is longer than one HELLO, so it comes in several; the tunnel
        stays up and serves, and every port has its answer.
        """
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        low, high = self.ports[0], self.ports[-1]  # the allowed range
        outside = [port for port in range(20000, 65536) if not low <= port <= high][:130]
        wanted = [open_port(port, target) for port in outside]
        _, factory = yield self.start_client(wanted, wait=False)
        yield wait_until(lambda: factory.open_ports_answer is not None
                         and len(factory.open_ports_answer) == 130,
                         what="all 130 answers")
        self.assertFalse(any(answer["ok"] for answer in factory.open_ports_answer))
        self.assertFalse([e for e in self.events if "protocol error" in e.get("log_format", "")])
        got = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1", target,
                                  b"still up")
        self.assertEqual(got, b"still up")

    @defer.inlineCallbacks
    def two_clients_one_port(self):
        """Clients "one" (an AnswerAfterEOF target) and "two" (an Echo) ask for one port."""
        one = listen_tcp(self, protocol.Factory.forProtocol(AnswerAfterEOF)).getHost().port
        two = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        remote = self.ports[3]
        first = yield self.start_client([open_port(remote, one)], client_id="one")
        second = yield self.start_client([open_port(remote, two)], client_id="two")
        return remote, first, second

    @defer.inlineCallbacks
    def test_second_client_refused(self):
        """Two clients ask for one port: the second is refused, naming the first."""
        remote, (_, first), (_, second) = yield self.two_clients_one_port()
        self.assertTrue(first.open_ports_answer[0]["ok"])
        self.assertEqual(second.open_ports_answer, [{
            "remote_port": remote, "protocol": "tcp", "ok": False,
            "error": "port %d/tcp already forwarded for client one" % (remote,)}])
        self.assertEqual(len(self.deployment.gateway.tunnel_pool.tunnels()), 2)
        got = yield deferToThread(tcp_exchange, remote, b"abc")
        self.assertEqual(got, b"3 %s\n" % (hashlib.sha256(b"abc").hexdigest().encode(),))

    @defer.inlineCallbacks
    def test_standby_takes_over(self):
        """When the holder goes, the refused client gets the port without reconnecting."""
        remote, (first_client, _), (_, second) = yield self.two_clients_one_port()
        self.assertFalse(second.open_ports_answer[0]["ok"])
        established = second.established
        yield first_client.stopService()
        yield wait_until(lambda: second.open_ports_answer[0]["ok"],
                         what="the port to be handed over")
        self.assertEqual(self.forwarding.forwards(), {(remote, "tcp"): "two"})
        self.assertEqual((yield deferToThread(tcp_exchange, remote, b"standby")), b"standby")
        self.assertEqual(second.established, established)  # the same tunnel, no reconnect


class LifecycleTests(_Base):
    """Ports follow the client: released when it goes, opened again when it returns."""

    @defer.inlineCallbacks
    def test_released_and_reopened(self):
        """After the client stops the port is closed; a returning client gets it again."""
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        echo = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1", maxPacketSize=65535)
        self.addCleanup(echo.stopListening)
        remote = self.ports[0]
        wanted = [open_port(remote, target), open_port(remote, echo.getHost().port, "udp")]
        client, _ = yield self.start_client(wanted)
        self.assertEqual(set(self.forwarding.forwards()),
                         {(remote, "tcp"), (remote, "udp")})
        yield deferToThread(udp_exchange, remote, [b"before"])

        yield client.stopService()
        yield wait_until(lambda: not self.forwarding.forwards(), what="the ports to be released")
        yield sleep(0.05)  # a stopped port closes its socket on the next reactor turn
        self.assertTrue((yield deferToThread(tcp_refused, remote)))

        _, factory = yield self.start_client(wanted)
        self.assertTrue(all(entry["ok"] for entry in factory.open_ports_answer))
        self.assertEqual((yield deferToThread(tcp_exchange, remote, b"back")), b"back")
        answers = yield deferToThread(udp_exchange, remote, [b"after"])
        self.assertEqual(answers, [(b"echo:after", ("127.0.0.1", remote))])

    @defer.inlineCallbacks
    def test_gateway_stop_releases_ports(self):
        """Stopping the gateway closes its forwarded ports."""
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        remote = self.ports[1]
        yield self.start_client([open_port(remote, target)])
        yield self.deployment.gateway.stopService()
        self.assertEqual(self.forwarding.forwards(), {})
        self.assertTrue((yield deferToThread(tcp_refused, remote)))


def tcp_exchange_at(host, port, payload, timeout=10):
    """Connect to host:port, send C{payload}, half-close, read to EOF."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def tcp_refused_at(host, port):
    """Whether nothing listens on host:port."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    return False


class InterfaceTests(unittest.TestCase):
    """
    Forwarded ports listen on 127.0.0.1 unless gateway.open_ports_interface
    names another address, whatever address the tunnel listener has.  In
    these tests 127.0.0.2 stands for a public interface.
    """

    timeout = 60

    @defer.inlineCallbacks
    def forward(self, tunnel_host="127.0.0.1", reload_to=None, **gateway):
        remote, self.outside = free_ports(2)
        deployment = Deployment(self)
        gateway["open_ports_allowed"] = [remote]
        gateway["listen_addr"] = "%s:0" % (tunnel_host,)
        yield deployment.start_gateway(gateway=gateway)
        if reload_to is not None:
            config = deployment.gateway_config(gateway=dict(gateway, **reload_to))
            yield deployment.gateway.reconfigure(load_config(deployment.write_config(config)))
        target = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        client = yield deployment.start_client(wait=False, client={
            "gateway_addr": "%s:%d" % (tunnel_host, deployment.gateway_port),
            "gateway_server_name": "localhost", "open_ports": [open_port(remote, target)]})
        factory = list(client.factories.values())[0]
        yield wait_until(lambda: factory.open_ports_answer is not None,
                         what="the gateway's open_ports answer")
        self.assertTrue(factory.open_ports_answer[0]["ok"], factory.open_ports_answer)
        forward = deployment.gateway.port_forwarding.port_for(remote)
        return remote, forward.listening.getHost().host

    @defer.inlineCallbacks
    def test_loopback_by_default(self):
        """With the tunnel listener on another address, the forwarded port is on 127.0.0.1
        only."""
        remote, host = yield self.forward(tunnel_host="127.0.0.2")
        self.assertEqual(host, "127.0.0.1")
        self.assertEqual((yield deferToThread(tcp_exchange_at, "127.0.0.1", remote, b"hi")),
                         b"hi")
        self.assertTrue((yield deferToThread(tcp_refused_at, "127.0.0.2", remote)))

    @defer.inlineCallbacks
    def test_opt_in(self):
        """open_ports_interface names where forwarded ports listen."""
        remote, host = yield self.forward(open_ports_interface="127.0.0.2")
        self.assertEqual(host, "127.0.0.2")
        self.assertEqual((yield deferToThread(tcp_exchange_at, "127.0.0.2", remote, b"hi")),
                         b"hi")
        self.assertTrue((yield deferToThread(tcp_refused_at, "127.0.0.1", remote)))

    @defer.inlineCallbacks
    def test_every_interface_dual_stack(self):
        """open_ports_interface "::" takes IPv6 and IPv4 users (IPV6_V6ONLY off)."""
        remote, host = yield self.forward(open_ports_interface="::")
        self.assertEqual(host, "::")
        for address in ("127.0.0.1", "::1"):
            self.assertEqual((yield deferToThread(tcp_exchange_at, address, remote, b"hi")),
                             b"hi", address)

    test_every_interface_dual_stack.skip = NO_IPV6_LOOPBACK

    @defer.inlineCallbacks
    def test_reload(self):
        """A reload's open_ports_interface applies to ports opened afterwards."""
        remote, host = yield self.forward(reload_to={"open_ports_interface": "127.0.0.2"})
        self.assertEqual(host, "127.0.0.2")
