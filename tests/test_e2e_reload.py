"""
Config reload end to end on loopback: a gateway and a client in this
process (L{tests.support.Deployment}), a new YAML written over the config
file, then L{anyproxy.twistd.reload.Reloader.reload} (what SIGHUP calls).  Each
test also keeps a stream opened before the reload and checks it still
carries data afterwards.
"""

import base64
import os
import socket
import ssl
import struct

import yaml
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from anyproxy.twistd.reload import Reloader
from tests.support import (
    PROXY_PASSWORD, PROXY_USER, Deployment, Echo, SecretWatch, listen_tcp, run_curl, web_site)
from tests.test_e2e_tcp import socks_connect, socks_error
from tests.ports import free_port
from tests.test_e2e_twistd import port_open, wait_until

NEW_PASSWORD = "n3w-proxy-pw"


def roundtrip(sock, data):
    """Send C{data} on an echo stream and read it back."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def recv_until_closed(sock):
    """What arrives until the proxy closes C{sock} (b"" if it closes at once)."""
    sock.settimeout(10)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


def socks_roundtrip(proxy_port, port, data, password=PROXY_PASSWORD, host="127.0.0.1"):
    sock = socks_connect(proxy_port, host, port, password=password)
    try:
        return roundtrip(sock, data)
    finally:
        sock.close()


def write_yaml(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


class _ReloadBase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        SecretWatch(self, secrets=[NEW_PASSWORD])
        self.gateway = yield self.deployment.start_gateway()
        self.client = yield self.deployment.start_client()
        self.gateway_reloader = Reloader(self.gateway.config.path, "gateway", self.gateway,
                                         self.gateway.config, reactor)
        self.client_reloader = Reloader(self.client.config.path, "client", self.client,
                                        self.client.config, reactor)
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.web_port = listen_tcp(self, web_site()).getHost().port
        self.lines = []
        globalLogPublisher.addObserver(self._log)
        self.addCleanup(globalLogPublisher.removeObserver, self._log)

    def _log(self, event):
        self.lines.append(formatEvent(event))

    def reload_lines(self, prefix):
        return [line for line in self.lines if line.startswith(prefix)]

    @defer.inlineCallbacks
    def open_stream(self):
        """An echo stream through SOCKS5 (old credentials), checked once; closed at cleanup."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        self.addCleanup(sock.close)
        got = yield deferToThread(roundtrip, sock, b"before the reload")
        self.assertEqual(got, b"before the reload")
        return sock

    @defer.inlineCallbacks
    def assert_flows(self, sock):
        payload = os.urandom(100000)
        got = yield deferToThread(roundtrip, sock, payload)
        self.assertEqual(got, payload)

    def reload_gateway(self, **overrides):
        write_yaml(self.gateway.config.path, self.deployment.gateway_config(**overrides))
        return self.gateway_reloader.reload()

    def reload_client(self, **overrides):
        data = self.deployment.client_config(client=overrides)
        write_yaml(self.client.config.path, data)
        return self.client_reloader.reload()

    @defer.inlineCallbacks
    def http_status(self, password, port=None):
        out, err, code = yield run_curl(
            "-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, password,
                                                 port or self.deployment.http_port),
            "-o", "/dev/null", "-w", "%{http_code}",
            "http://127.0.0.1:%d/hello" % (self.web_port,))
        self.assertEqual(code, 0, err)
        return out.decode()


def proxies(password, socks_addr="127.0.0.1:0"):
    """The C{proxy} section with C{password} on both listeners."""
    return {"socks5": {"listen_addr": socks_addr, "auth_username": PROXY_USER,
                       "auth_password": password},
            "http": {"listen_addr": "127.0.0.1:0", "auth_username": PROXY_USER,
                     "auth_password": password}}


class GatewayReloadTests(_ReloadBase):
    """Passwords, listen addresses and certificates changed on a running gateway."""

    @defer.inlineCallbacks
    def test_password_change(self):
        """A new proxy password replaces the old one for new logins; a running stream goes on."""
        sock = yield self.open_stream()
        self.assertTrue((yield self.reload_gateway(proxy=proxies(NEW_PASSWORD))))
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                  self.echo_port)
        self.assertIn("authentication failed", msg.lower())
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"new", password=NEW_PASSWORD)
        self.assertEqual(got, b"new")
        self.assertEqual((yield self.http_status(PROXY_PASSWORD)), "407")
        self.assertEqual((yield self.http_status(NEW_PASSWORD)), "200")
        yield self.assert_flows(sock)
        self.assertEqual(self.reload_lines("reload applied"), [
            "reload applied: proxy.socks5.auth_password, proxy.http.auth_password changed; "
            "certificates re-read"])

    @defer.inlineCallbacks
    def test_listen_port_change(self):
        """A new SOCKS5 port serves; the old one closes after; its connection survives."""
        old_port = self.deployment.socks_port
        sock = yield self.open_stream()
        new_port = free_port()
        self.assertTrue((yield self.reload_gateway(
            proxy=proxies(PROXY_PASSWORD, "127.0.0.1:%d" % (new_port,)))))
        self.assertEqual(self.gateway.listeners["socks5 proxy"].port.getHost().port, new_port)
        got = yield deferToThread(socks_roundtrip, new_port, self.echo_port, b"via the new port")
        self.assertEqual(got, b"via the new port")
        self.assertFalse(port_open(old_port))
        yield self.assert_flows(sock)

    @defer.inlineCallbacks
    def test_tunnel_port_and_gateway_list(self):
        """
        The tunnel listener moves without dropping the connected tunnel; the
        client, given the new address, drops its old tunnel and connects there.
        """
        old_port = self.deployment.gateway_port
        sock = yield self.open_stream()
        new_port = free_port()
        self.assertTrue((yield self.reload_gateway(
            gateway={"listen_addr": "127.0.0.1:%d" % (new_port,)})))
        self.assertFalse(port_open(old_port))
        yield self.assert_flows(sock)  # the tunnel came in on the old port
        [old_tunnel] = self.gateway.tunnel_pool.tunnels()

        self.assertTrue((yield self.reload_client(gateway_addr="127.0.0.1:%d" % (new_port,))))
        self.assertEqual(list(self.client.factories), [("127.0.0.1", new_port)])
        yield wait_until(lambda: [t for t in self.gateway.tunnel_pool.tunnels()
                                  if t is not old_tunnel], timeout=10)
        yield wait_until(lambda: old_tunnel not in self.gateway.tunnel_pool.tunnels(), timeout=10)
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"through the new tunnel")
        self.assertEqual(got, b"through the new tunnel")

    @defer.inlineCallbacks
    def test_certificate_reread(self):
        """New TLS connections get the new certificate; the connected tunnel stays."""
        sock = yield self.open_stream()
        cert = self.deployment.pki.ca.issue_cert("localhost", "127.0.0.1")
        directory = self.deployment.pki.directory
        cert_path, key_path = (os.path.join(directory, "new.crt"),
                               os.path.join(directory, "new.key"))
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        self.assertTrue((yield self.reload_gateway(
            gateway={"tls_cert": cert_path, "tls_key": key_path})))
        served = yield deferToThread(ssl.get_server_certificate,
                                     ("127.0.0.1", self.deployment.gateway_port))
        self.assertEqual(ssl.PEM_cert_to_DER_cert(served),
                         ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode()))
        yield self.assert_flows(sock)

    @defer.inlineCallbacks
    def test_broken_file_refused(self):
        """Bad YAML is refused in one line naming the file; the old password still works."""
        sock = yield self.open_stream()
        with open(self.gateway.config.path, "w") as f:
            f.write("proxy:\n  socks5: {listen_addr: [\n")
        self.assertFalse((yield self.gateway_reloader.reload()))
        [line] = self.reload_lines("reload refused")
        self.assertTrue(line.startswith("reload refused: %s: " % (self.gateway.config.path,)))
        self.assertIn("bad YAML", line)
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"still the old password")
        self.assertEqual(got, b"still the old password")
        yield self.assert_flows(sock)


class ClientReloadTests(_ReloadBase):
    """Access control and replicas changed on a running client."""

    @defer.inlineCallbacks
    def test_acl_change_both_ways(self):
        """
        A target forbidden by a reload is refused, and its open streams are
        closed; streams to other targets go on.  Allowing it again works.
        """
        sock = yield self.open_stream()
        revoked = yield deferToThread(socks_connect, self.deployment.socks_port, "target.test",
                                      self.echo_port)
        self.addCleanup(revoked.close)
        self.assertEqual((yield deferToThread(roundtrip, revoked, b"before")), b"before")
        self.assertTrue((yield self.reload_client(forbidden_hosts=["target.test"])))
        msg = yield deferToThread(socks_error, self.deployment.socks_port, "target.test",
                                  self.echo_port)
        self.assertIn("0x02", msg)
        self.assertEqual((yield deferToThread(recv_until_closed, revoked)), b"")
        yield self.assert_flows(sock)

        self.assertTrue((yield self.reload_client(forbidden_hosts=[])))
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"allowed again", host="target.test")
        self.assertEqual(got, b"allowed again")
        yield self.assert_flows(sock)

    @defer.inlineCallbacks
    def test_bad_cidr_refused(self):
        """A bad CIDR is refused naming the file and key; the old ACL stays in force."""
        sock = yield self.open_stream()
        self.assertFalse((yield self.reload_client(forbidden_hosts=["127.0.0.0/33"])))
        [line] = self.reload_lines("reload refused")
        self.assertIn("%s: client.forbidden_hosts[0]: " % (self.client.config.path,), line)
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"still allowed")
        self.assertEqual(got, b"still allowed")
        yield self.assert_flows(sock)

    @defer.inlineCallbacks
    def test_replicas(self):
        """Raising replicas connects more tunnels; lowering closes the extra ones."""
        registry = self.gateway.tunnel_pool
        self.assertTrue((yield self.reload_client(replicas=3)))
        yield wait_until(lambda: len(registry.tunnels()) == 3, timeout=10)
        self.assertTrue((yield self.reload_client(replicas=1)))
        yield wait_until(lambda: len(registry.tunnels()) == 1, timeout=10)
        got = yield deferToThread(socks_roundtrip, self.deployment.socks_port, self.echo_port,
                                  b"one tunnel left")
        self.assertEqual(got, b"one tunnel left")


BOB = {"username": "bob", "password": "b0b-users-pw"}


def socks_login(port, username, password):
    """A SOCKS5 connection logged in as C{username} (greeting and login only)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01\x02")
    assert sock.recv(2) == b"\x05\x02"
    sock.sendall(b"\x01" + bytes([len(username)]) + username.encode()
                 + bytes([len(password)]) + password.encode())
    assert sock.recv(2) == b"\x01\x00", "login refused"
    return sock


def socks_request(sock, port):
    """Send a CONNECT to 127.0.0.1:C{port} on a logged-in C{sock}; the reply code."""
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    reply = sock.recv(10)
    return reply[1] if len(reply) > 1 else None


def http_get_status(sock, port, username, password):
    """A GET through the HTTP proxy on the kept-alive C{sock}: the status line's code."""
    token = base64.b64encode(("%s:%s" % (username, password)).encode()).decode()
    sock.sendall(("GET http://127.0.0.1:%d/hello HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                  "Proxy-Authorization: Basic %s\r\n\r\n" % (port, port, token)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


class UserRemovedTests(unittest.TestCase):
    """
    A gateway.users entry removed by a reload opens no new stream, wherever
    its login was made: a connection logged in before the reload, a stream
    waiting for its slot, a keep-alive connection of a listener a reload
    replaced.
    """

    timeout = 60

    @defer.inlineCallbacks
    def start(self, **gateway):
        self.deployment = Deployment(self)
        self.gateway = yield self.deployment.start_gateway(gateway=gateway)
        yield self.deployment.start_client()
        self.reloader = Reloader(self.gateway.config.path, "gateway", self.gateway,
                                 self.gateway.config, reactor)
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def reload(self, proxy=None, **gateway):
        data = self.deployment.gateway_config(gateway=gateway)
        if proxy is not None:
            data["proxy"] = proxy
        write_yaml(self.gateway.config.path, data)
        return self.reloader.reload()

    @defer.inlineCallbacks
    def test_logged_in_before_the_reload(self):
        """bob logged in, the reload removes bob: his CONNECT on that connection gets 0x02."""
        yield self.start(users=[BOB])
        sock = yield deferToThread(socks_login, self.deployment.socks_port, "bob",
                                   BOB["password"])
        self.addCleanup(sock.close)
        self.assertTrue((yield self.reload(users=[])))
        self.assertEqual((yield deferToThread(socks_request, sock, self.echo_port)), 0x02)

    @defer.inlineCallbacks
    def test_stream_waiting_for_its_slot(self):
        """bob at max_streams 1: a second CONNECT waits; bob removed, it is refused when the slot frees."""
        yield self.start(users=[dict(BOB, max_streams=1)], queue_timeout=10)
        first = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                    self.echo_port, username="bob", password=BOB["password"])
        self.addCleanup(first.close)
        second = yield deferToThread(socks_login, self.deployment.socks_port, "bob",
                                     BOB["password"])
        self.addCleanup(second.close)
        waiting = deferToThread(socks_request, second, self.echo_port)
        for _ in range(100):  # until the request waits in the queue
            if self.gateway.limits.per_user.waiting("bob"):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue((yield self.reload(users=[])))  # revokes the first, freeing the slot
        self.assertEqual((yield waiting), 0x02)
        self.assertEqual(self.gateway.user_endpoints.stream_table.count_by_user(), {})

    @defer.inlineCallbacks
    def test_replaced_listener_keep_alive_connection(self):
        """
        A reload replaces the HTTP listener (new options); a later one removes
        bob: the first listener's keep-alive connection refuses him too (407).
        """
        web_port = listen_tcp(self, web_site()).getHost().port
        yield self.start(users=[BOB])
        sock = yield deferToThread(socket.create_connection,
                                   ("127.0.0.1", self.deployment.http_port), 10)
        self.addCleanup(sock.close)
        self.assertEqual((yield deferToThread(http_get_status, sock, web_port, "bob",
                                              BOB["password"])), 200)
        proxy = self.deployment.gateway_config()["proxy"]
        proxy["http"]["options"] = {"realm": "another realm"}
        self.assertTrue((yield self.reload(proxy=proxy, users=[BOB])))
        self.assertEqual((yield deferToThread(http_get_status, sock, web_port, "bob",
                                              BOB["password"])), 200)
        self.assertTrue((yield self.reload(proxy=proxy, users=[])))
        self.assertEqual((yield deferToThread(http_get_status, sock, web_port, "bob",
                                              BOB["password"])), 407)
