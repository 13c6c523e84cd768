"""
End to end on loopback: the tunnel's own behaviour (client authentication,
certificate verification, mutual TLS, reconnect after either side restarts,
streams reset when their tunnel dies).
"""

import os
import socket

import trustme
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.support import CLIENT_PASSWORD, CLIENT_USER, Deployment, Echo, listen_tcp, run_curl
from tests.test_e2e_tcp import socks_connect, socks_echo

UPGRADE_HEADERS = ("-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
                   "-H", "Sec-WebSocket-Version: 13",
                   "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                   "-H", "Sec-WebSocket-Protocol: anyproxy.v1")


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class TunnelAuthTests(unittest.TestCase):
    """Who may open a tunnel, checked before the WebSocket upgrade."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()

    def upgrade(self, *auth):
        url = "https://127.0.0.1:%d/anyproxy" % (self.deployment.gateway_port,)
        return run_curl("--http1.1", "--cacert", self.deployment.pki.ca_path, "-o", "/dev/null",
                        "-w", "%{http_code}", "--max-time", "3", *(UPGRADE_HEADERS + auth + (url,)))

    @defer.inlineCallbacks
    def test_upgrade_refused_without_credentials(self):
        """A WebSocket upgrade without or with wrong credentials gets 401; right ones get 101."""
        out, _, _ = yield self.upgrade()
        self.assertEqual(out, b"401")
        out, _, _ = yield self.upgrade("-u", "%s:wrong" % (CLIENT_USER,))
        self.assertEqual(out, b"401")
        out, _, _ = yield self.upgrade("-u", "%s:%s" % (CLIENT_USER, CLIENT_PASSWORD))
        self.assertEqual(out, b"101")

    @defer.inlineCallbacks
    def test_client_with_wrong_password_never_registers(self):
        """A client presenting a wrong password gets no tunnel and keeps backing off."""
        client = yield self.deployment.start_client(wait=False, client={"auth_password": "bad"})
        yield sleep(1.5)
        self.assertEqual(self.deployment.gateway.tunnel_pool.tunnels(), [])
        factory = list(client.factories.values())[0]
        self.assertEqual(factory.connected, set())

    @defer.inlineCallbacks
    def test_client_refuses_untrusted_gateway(self):
        """A client that does not trust the gateway's certificate refuses to connect."""
        other_ca = os.path.join(self.deployment.directory, "other-ca.crt")
        with open(other_ca, "wb") as f:
            f.write(trustme.CA().cert_pem.bytes())
        yield self.deployment.start_client(wait=False, client={"gateway_tls_cert": other_ca})
        yield sleep(1.5)
        self.assertEqual(self.deployment.gateway.tunnel_pool.tunnels(), [])

    @defer.inlineCallbacks
    def test_client_checks_gateway_hostname(self):
        """The gateway's certificate must name the address the client dials."""
        yield self.deployment.start_client(wait=False, client={
            "gateway_server_name": "not-the-gateway.example"})
        yield sleep(1.5)
        self.assertEqual(self.deployment.gateway.tunnel_pool.tunnels(), [])


class MutualTLSTests(unittest.TestCase):
    """With client_ca set, the gateway requires a client certificate."""

    timeout = 30

    @defer.inlineCallbacks
    def test_client_certificate_required(self):
        """A client without a certificate is refused; one with a CA-issued certificate serves."""
        deployment = Deployment(self)
        pki = deployment.pki
        yield deployment.start_gateway(gateway={"client_ca": pki.ca_path})
        yield deployment.start_client(wait=False)
        yield sleep(1.5)
        self.assertEqual(deployment.gateway.tunnel_pool.tunnels(), [])

        issued = pki.ca.issue_cert("client-2")
        cert = os.path.join(deployment.directory, "client.crt")
        key = os.path.join(deployment.directory, "client.key")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        yield deployment.start_client(client={"tls_cert": cert, "tls_key": key,
                                              "client_id": "client-2"})
        ids = [t.client_id for t in deployment.gateway.tunnel_pool.tunnels()]
        self.assertEqual(ids, ["client-2"])


class ReconnectTests(unittest.TestCase):
    """The client comes back by itself after either side restarts."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def echo(self):
        return deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                             self.echo_port, b"ping")

    @defer.inlineCallbacks
    def test_gateway_restart(self):
        """After the gateway stops and starts again on its ports, service resumes."""
        yield self.deployment.start_client()
        self.assertEqual((yield self.echo()), b"ping")
        old = self.deployment.gateway
        ports = {"tunnel": self.deployment.gateway_port, "socks": self.deployment.socks_port,
                 "http": self.deployment.http_port}
        yield old.stopService()
        yield self.deployment.start_gateway(
            gateway={"listen_addr": "127.0.0.1:%d" % ports["tunnel"]},
            proxy={"socks5": {"listen_addr": "127.0.0.1:%d" % ports["socks"]},
                   "http": {"listen_addr": "127.0.0.1:%d" % ports["http"]}})
        yield self.deployment.wait_for_tunnel(timeout=10)
        self.assertEqual((yield self.echo()), b"ping")

    @defer.inlineCallbacks
    def test_gateway_stop_says_goaway(self):
        """A gateway that stops sends GOAWAY on each tunnel before closing it."""
        lines = []

        def observe(event):
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        yield self.deployment.start_client()
        yield self.deployment.gateway.stopService()
        for _ in range(100):
            if [line for line in lines if "peer is going away (NO_TUNNEL)" in line]:
                break
            yield sleep(0.05)
        else:
            self.fail("the client did not log the gateway's GOAWAY")

    @defer.inlineCallbacks
    def test_open_crossing_client_go_away(self):
        """
        A client letting go of a tunnel (fleet attachment) while the gateway
        opens a stream on it: the OPEN crosses the client's GOAWAY, and the
        client serves it before it closes the tunnel.
        """
        client = yield self.deployment.start_client()
        (tunnel,) = self.deployment.gateway.tunnel_pool.tunnels()
        (key,) = client.factories
        (service,) = client._tunnels[key]
        for _ in range(100):  # the client's side of the HELLO too
            if service.ready_endpoint.tunnel is not None:
                break
            yield sleep(0.02)
        # One reactor turn: the OPEN is written before the client reads
        # anything, the client's GOAWAY before the gateway does.
        opening = tunnel.mux.open_stream("tcp", "127.0.0.1", self.echo_port)
        client._drop_gateway(key, gently=True)
        stream = yield opening
        received = defer.Deferred()

        class Reader(protocol.Protocol):
            def dataReceived(self, data):
                if not received.called:
                    received.callback(data)

        stream.attach(Reader())
        stream.write(b"crossed")
        self.assertEqual((yield received), b"crossed")
        stream.loseConnection()
        for _ in range(100):  # then the client closes the drained tunnel
            if not self.deployment.gateway.tunnel_pool.tunnels():
                break
            yield sleep(0.05)
        self.assertEqual(self.deployment.gateway.tunnel_pool.tunnels(), [])

    @defer.inlineCallbacks
    def test_client_restart(self):
        """A client that stops is dropped from the pool; a new one serves again."""
        client = yield self.deployment.start_client()
        yield client.stopService()
        yield sleep(0.2)
        self.assertEqual(self.deployment.gateway.tunnel_pool.tunnels(), [])
        yield self.deployment.start_client()
        self.assertEqual((yield self.echo()), b"ping")

    @defer.inlineCallbacks
    def test_tunnel_loss_closes_user_connections(self):
        """When the tunnel dies, a user's open stream is closed, not left hanging."""
        client = yield self.deployment.start_client()
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port, timeout=10)
        self.addCleanup(sock.close)
        yield deferToThread(sock.sendall, b"hello")
        self.assertEqual((yield deferToThread(sock.recv, 5)), b"hello")
        yield client.stopService()

        def read_until_closed():
            try:
                return sock.recv(100)
            except (ConnectionResetError, socket.timeout) as e:
                return e

        result = yield deferToThread(read_until_closed)
        self.assertIn(result, (b"",)) if isinstance(result, bytes) else \
            self.assertIsInstance(result, ConnectionResetError)


class RoutingTests(unittest.TestCase):
    """Several clients share the load; one that leaves takes no new streams."""

    timeout = 60

    @defer.inlineCallbacks
    def test_spread_and_failover(self):
        """Streams alternate between two clients; after one stops all go to the other."""
        deployment = Deployment(self)
        yield deployment.start_gateway()
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield deployment.start_client(client={"client_id": "one"})
        second = yield deployment.start_client(client={"client_id": "two"})
        yield wait_for_tunnels(deployment, 2)

        def open_streams(count):
            return deferToThread(lambda: [
                socks_connect(deployment.socks_port, "127.0.0.1", echo_port)
                for _ in range(count)])

        socks = yield open_streams(20)
        self.addCleanup(lambda: [s.close() for s in socks])
        counts = {t.client_id: t.active_streams for t in deployment.gateway.tunnel_pool.tunnels()}
        self.assertEqual(counts, {"one": 10, "two": 10})

        yield second.stopService()
        yield wait_for_tunnels(deployment, 1)
        more = yield open_streams(5)
        self.addCleanup(lambda: [s.close() for s in more])
        got = yield deferToThread(lambda: [socks_echo(deployment.socks_port, "127.0.0.1",
                                                      echo_port, b"x") for _ in range(3)])
        self.assertEqual(got, [b"x"] * 3)
        (tunnel,) = deployment.gateway.tunnel_pool.tunnels()
        self.assertEqual((tunnel.client_id, tunnel.active_streams), ("one", 15))


@defer.inlineCallbacks
def wait_for_tunnels(deployment, count, timeout=10):
    for _ in range(int(timeout / 0.05)):
        if len(deployment.gateway.tunnel_pool.tunnels()) == count:
            return
        yield sleep(0.05)
    raise AssertionError("expected %d tunnels" % (count,))


class GroupRoutingTests(unittest.TestCase):
    """A user's streams go only to clients of the user's group."""

    timeout = 60

    @defer.inlineCallbacks
    def test_groups_are_isolated(self):
        """bob (group lab) reaches only the lab client; with none connected he gets 'no tunnel'."""
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={
            "users": [{"username": "bob", "password": "bob-pw", "group": "lab"}],
            "clients": [{"username": "lab-site", "password": "lab-site-pw", "groups": ["lab"]}]})
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield deployment.start_client(client={"client_id": "office"})

        def bob_error():
            from tests.test_e2e_tcp import socks_error
            return deferToThread(socks_error, deployment.socks_port, "127.0.0.1", echo_port,
                                 username="bob", password="bob-pw")

        self.assertIn("0x01", (yield bob_error()))  # the default-group client is not his
        yield deployment.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab", "auth_username": "lab-site",
            "auth_password": "lab-site-pw"})
        sock = yield deferToThread(socks_connect, deployment.socks_port, "127.0.0.1",
                                   echo_port, username="bob", password="bob-pw")
        self.addCleanup(sock.close)
        tunnels = deployment.gateway.tunnel_pool.tunnels()
        streams = {t.client_id: t.active_streams for t in tunnels}
        self.assertEqual(streams, {"office": 0, "lab-1": 1})


class GroupPasswordTests(unittest.TestCase):
    """A client's group_password makes group_id:group_password a proxy login for its group."""

    timeout = 60

    @defer.inlineCallbacks
    def test_group_login(self):
        """lab:lab-pw reaches only the lab client, on both proxies, and only while it is connected."""
        from tests.support import web_site
        from tests.test_e2e_tcp import socks_error
        from twisted.logger import formatEvent, globalLogPublisher
        logged = []

        def observer(event):
            logged.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"auth_groups": ["default", "ops", "lab"]})
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        web_port = listen_tcp(self, web_site()).getHost().port
        # Other groups, one of them announcing the same password: never used for lab.
        yield deployment.start_client(client={"client_id": "office", "group_password": "lab-pw"})
        yield deployment.start_client(group="ops", client={
            "client_id": "ops-1", "group_id": "ops", "group_password": "lab-pw"})
        lab = yield deployment.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab", "group_password": "lab-pw"})
        yield wait_for_tunnels(deployment, 3)

        def streams():
            tunnels = deployment.gateway.tunnel_pool.tunnels()
            return {t.client_id: t.active_streams for t in tunnels}

        sock = yield deferToThread(socks_connect, deployment.socks_port, "127.0.0.1",
                                   echo_port, username="lab", password="lab-pw")
        self.addCleanup(sock.close)
        yield deferToThread(sock.sendall, b"lab?")
        self.assertEqual((yield deferToThread(sock.recv, 4)), b"lab?")
        self.assertEqual(streams(), {"office": 0, "ops-1": 0, "lab-1": 1})

        url = "http://127.0.0.1:%d/" % (web_port,)
        out, err, code = yield run_curl(
            "-x", "http://lab:lab-pw@127.0.0.1:%d" % (deployment.http_port,), url)
        self.assertEqual((code, out), (0, b"hello from the target\n"), err)

        wrong = yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1", echo_port,
                                    username="lab", password="lab-pw-wrong")
        self.assertIn("authentication failed", wrong)
        out, _, _ = yield run_curl(
            "-x", "http://lab:nope@127.0.0.1:%d" % (deployment.http_port,), "-i", url)
        self.assertIn(b"407", out.split(b"\r\n")[0])
        sock.close()

        yield lab.stopService()
        yield wait_for_tunnels(deployment, 2)
        gone = yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1", echo_port,
                                   username="lab", password="lab-pw")
        self.assertIn("authentication failed", gone)
        self.assertEqual(streams(), {"office": 0, "ops-1": 0})
        # The static user is unaffected, and ops' own login still works.
        self.assertIsNone((yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1",
                                               echo_port)))
        self.assertIsNone((yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1",
                                               echo_port, username="ops", password="lab-pw")))
        self.assertTrue(any("group login" in line for line in logged))
        self.assertEqual([line for line in logged if "lab-pw" in line], [])


class TlsNoiseTests(unittest.TestCase):
    """Plain text on the tunnel port is the peer's failure: no error-level log line."""

    timeout = 30

    @defer.inlineCallbacks
    def test_plain_text_logged_at_info(self):
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        deployment = Deployment(self)
        yield deployment.start_gateway()

        def send_noise():
            with socket.create_connection(("127.0.0.1", deployment.gateway_port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(5)
                try:
                    while sock.recv(4096):
                        pass
                except OSError:
                    pass

        for _ in range(3):
            yield deferToThread(send_noise)
        def failed_lines():
            return [e for e in events if e.get("log_format", "").startswith("tunnel from {peer}: TLS failed")]

        for _ in range(100):
            if len(failed_lines()) == 3:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        failed = failed_lines()
        self.assertEqual(len(failed), 3)
        self.assertEqual({e["log_level"] for e in failed}, {LogLevel.info})
        self.assertEqual([formatEvent(e) for e in events
                          if e.get("log_level") in (LogLevel.error, LogLevel.critical)], [])
