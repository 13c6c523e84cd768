# -*- test-case-name: tests.test_e2e_tenants -*-
"""
End to end: each client credential serves only the groups it is granted
(L{anyproxy.gateway.client_access}).  A client host holding one group's
credential, or the shared one, cannot take another group's users, mint
logins for it, or exceed its tunnel cap; the refused client hears why.
"""

import os

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from anyproxy.config.load import load_config
from tests.support import Deployment, Echo, listen_tcp
from tests.test_e2e_tcp import socks_connect, socks_error

LAB_SITE = {"username": "lab-site", "password": "lab-site-pw", "groups": ["lab"]}
BOB = {"username": "bob", "password": "bob-pw", "group": "lab"}


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class LogLines:
    """Every log line while the test runs, formatted."""

    def __init__(self, testcase):
        self.lines = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event):
        self.lines.append(formatEvent(event))

    def matching(self, text):
        return [line for line in self.lines if text in line]

    @defer.inlineCallbacks
    def wait_for(self, text, timeout=10):
        for _ in range(int(timeout / 0.05)):
            if self.matching(text):
                return self.matching(text)
            yield sleep(0.05)
        raise AssertionError("no log line with %r" % (text,))


def tunnels_by_group(deployment):
    found = {}
    for tunnel in deployment.gateway.tunnel_pool.tunnels():
        found.setdefault(tunnel.group, []).append(tunnel.client_id)
    return {group: sorted(ids) for group, ids in found.items()}


class RogueGroupTests(unittest.TestCase):
    """A client may announce only a group its credential allows."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = LogLines(self)
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway(gateway={"users": [BOB], "clients": [LAB_SITE]})
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        yield self.deployment.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab", "auth_username": "lab-site",
            "auth_password": "lab-site-pw", "group_password": "real-lab-pw"})

    @defer.inlineCallbacks
    def test_shared_credential_cannot_take_a_group(self):
        """
        The shared credential announcing group lab with a huge weight is
        refused with close code 4003 and a reason the client logs; bob's
        streams keep going to the lab client.
        """
        yield self.deployment.start_client(wait=False, client={
            "client_id": "rogue", "group_id": "lab", "weight": 10000})
        [line] = (yield self.logs.wait_for("gateway refused the tunnel (4003)"))[:1]
        self.assertIn("credential 'gateway.auth_username' may not serve group 'lab'", line)
        self.assertTrue(self.logs.matching("HELLO refused: credential 'gateway.auth_username'"))
        self.assertEqual(tunnels_by_group(self.deployment), {"lab": ["lab-1"]})
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port, username="bob", password="bob-pw")
        self.addCleanup(sock.close)
        [tunnel] = self.deployment.gateway.tunnel_pool.tunnels()
        self.assertEqual((tunnel.client_id, tunnel.active_streams), ("lab-1", 1))

    @defer.inlineCallbacks
    def test_minted_group_login_refused(self):
        """
        A group password announced for a group the credential may not serve
        is no login; the lab client's own group login works.
        """
        yield self.deployment.start_client(wait=False, client={
            "client_id": "rogue", "group_id": "lab", "group_password": "minted"})
        yield self.logs.wait_for("gateway refused the tunnel (4003)")
        error = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                    self.echo_port, username="lab", password="minted")
        self.assertIn("authentication", error.lower())
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port, username="lab", password="real-lab-pw")
        sock.close()

    @defer.inlineCallbacks
    def test_group_credential_cannot_take_another_group(self):
        """The lab credential announcing group default is refused too."""
        yield self.deployment.start_client(wait=False, client={
            "client_id": "lab-2", "group_id": "default", "auth_username": "lab-site",
            "auth_password": "lab-site-pw"})
        [line] = (yield self.logs.wait_for("gateway refused the tunnel (4003)"))[:1]
        self.assertIn("credential 'lab-site' may not serve group 'default' (it may serve: lab)",
                      line)
        self.assertEqual(tunnels_by_group(self.deployment), {"lab": ["lab-1"]})

    @defer.inlineCallbacks
    def test_reload_revokes_a_group(self):
        """A reload that takes lab from the credential closes its lab tunnels."""
        config = self.deployment.gateway_config(gateway={
            "users": [BOB], "clients": [dict(LAB_SITE, groups=["ops"])]})
        # The same listen addresses (port 0) as at start: nothing is re-bound.
        yield self.deployment.gateway.reconfigure(
            load_config(self.deployment.write_config(config)))
        yield self.logs.wait_for("no longer allows it")
        yield self.logs.wait_for("peer is going away (NOT_ALLOWED)")
        for _ in range(100):
            if not self.deployment.gateway.tunnel_pool.tunnels():
                break
            yield sleep(0.05)
        self.assertEqual(tunnels_by_group(self.deployment), {})
        # It comes back, and is refused now.
        yield self.logs.wait_for("gateway refused the tunnel (4003)")


class TunnelCapTests(unittest.TestCase):
    """A credential holds at most its max_tunnels tunnels."""

    timeout = 60

    @defer.inlineCallbacks
    def test_max_tunnels(self):
        """replicas: 3 against max_tunnels: 2 gives two tunnels and a 4029 refusal."""
        logs = LogLines(self)
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"clients": [dict(LAB_SITE, max_tunnels=2)]})
        yield deployment.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab", "auth_username": "lab-site",
            "auth_password": "lab-site-pw", "replicas": 3})
        [line] = (yield logs.wait_for("gateway refused the tunnel (4029)"))[:1]
        self.assertIn("credential 'lab-site' holds its max_tunnels (2) already", line)
        self.assertEqual(tunnels_by_group(deployment), {"lab": ["lab-1", "lab-1"]})


class CertificateSubjectTests(unittest.TestCase):
    """With mutual TLS, a certificate's subject is a credential bound to its groups."""

    timeout = 60

    def client_certificate(self, deployment, name):
        cert = deployment.pki.ca.issue_cert(name)
        directory = deployment.pki.directory
        cert_path = os.path.join(directory, name + ".crt")
        key_path = os.path.join(directory, name + ".key")
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        return {"tls_cert": cert_path, "tls_key": key_path}

    @defer.inlineCallbacks
    def test_subject_grants_its_groups(self):
        """
        site-a's certificate serves lab without a password; another
        certificate from the same CA with the shared password serves only
        default, and is refused for lab.
        """
        logs = LogLines(self)
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={
            "client_ca": deployment.pki.ca_path, "users": [BOB],
            "clients": [{"subject": "site-a.clients.test", "groups": ["lab"]}]})
        site_a = self.client_certificate(deployment, "site-a.clients.test")
        site_b = self.client_certificate(deployment, "site-b.clients.test")
        site_a_client = dict(site_a, client_id="site-a", group_id="lab", auth_username="",
                             auth_password="")
        yield deployment.start_client(group="lab", client=site_a_client)
        yield deployment.start_client(wait=False, client=dict(
            site_b, client_id="site-b", group_id="lab"))
        [line] = (yield logs.wait_for("gateway refused the tunnel (4003)"))[:1]
        self.assertIn("credential 'gateway.auth_username' may not serve group 'lab'", line)
        yield deployment.start_client(client=dict(site_b, client_id="site-b-default"))
        self.assertEqual(tunnels_by_group(deployment),
                         {"lab": ["site-a"], "default": ["site-b-default"]})
        [tunnel] = deployment.gateway.tunnel_pool.tunnels("lab")
        self.assertEqual(tunnel.credential, "subject:site-a.clients.test")


class SharedCredentialTests(unittest.TestCase):
    """The shared credential serves group default unless auth_groups says more."""

    timeout = 60

    @defer.inlineCallbacks
    def test_auth_groups_any_warns(self):
        """auth_groups ['*'] restores the old behaviour, with a warning at start-up."""
        logs = LogLines(self)
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"auth_groups": ["*"]})
        self.assertTrue(logs.matching("gateway.auth_groups is ['*']"))
        yield deployment.start_client(group="lab", client={"client_id": "x", "group_id": "lab"})
        self.assertEqual(tunnels_by_group(deployment), {"lab": ["x"]})

    @defer.inlineCallbacks
    def test_default_only_by_default(self):
        """By default the shared credential is told at start-up what it serves: default."""
        logs = LogLines(self)
        deployment = Deployment(self)
        yield deployment.start_gateway()
        self.assertTrue(logs.matching("client credential gateway.auth_username may serve default"))
        self.assertFalse(logs.matching("auth_groups is ['*']"))


class GroupPasswordConflictTests(unittest.TestCase):
    """Two clients of one group announcing different group passwords."""

    timeout = 60

    @defer.inlineCallbacks
    def test_both_valid_while_connected(self):
        """
        Each password is a login while a client announcing it is connected
        (a password rolled out client by client), and the gateway warns.
        """
        logs = LogLines(self)
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"clients": [LAB_SITE]})
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        lab = dict(group_id="lab", auth_username="lab-site", auth_password="lab-site-pw")
        old = yield deployment.start_client(group="lab", client=dict(
            lab, client_id="lab-old", group_password="old-pw"))
        yield deployment.start_client(group="lab", client=dict(
            lab, client_id="lab-new", group_password="new-pw"))
        yield logs.wait_for("announced a group_password other than")
        for password in ("old-pw", "new-pw"):
            sock = yield deferToThread(socks_connect, deployment.socks_port, "127.0.0.1",
                                       echo_port, username="lab", password=password)
            sock.close()
        yield old.stopService()
        for _ in range(100):
            if len(deployment.gateway.tunnel_pool.tunnels()) == 1:
                break
            yield sleep(0.05)
        error = yield deferToThread(socks_error, deployment.socks_port, "127.0.0.1",
                                    echo_port, username="lab", password="old-pw")
        self.assertIn("authentication", error.lower())


def upgrade_without_hello(port, ca_path, username, password):
    """
    A TLS WebSocket upgrade that logs in and then never sends its HELLO.
    @return: C{(socket, status line)}; the caller closes the socket.
    """
    import base64
    import socket
    import ssl
    context = ssl.create_default_context(cafile=ca_path)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    token = base64.b64encode(("%s:%s" % (username, password)).encode()).decode()
    sock.sendall((
        "GET /anyproxy HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: anyproxy.v1\r\n"
        "Authorization: Basic %s\r\n\r\n" % (token,)).encode())
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    except ConnectionResetError:
        pass  # a refusal's close can overtake its answer under load
    return sock, head.split(b"\r\n", 1)[0]


class BeforeHelloCapTests(unittest.TestCase):
    """Connections that logged in but sent no HELLO yet are capped per credential and in all."""

    timeout = 60

    @defer.inlineCallbacks
    def test_per_credential(self):
        """A credential with max_tunnels 2 holds at most 2 connections waiting for their HELLO."""
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"clients": [dict(LAB_SITE, max_tunnels=2)]})
        held = []
        self.addCleanup(lambda: [sock.close() for sock in held])
        waiting = deployment.gateway.tunnel_server.factory.waiting_for_hello
        for expected in (b"101", b"101", b"429"):
            sock, status = yield deferToThread(
                upgrade_without_hello, deployment.gateway_port, deployment.pki.ca_path,
                "lab-site", "lab-site-pw")
            held.append(sock)
            if expected == b"429" and not status:
                self.assertEqual(waiting.get("lab-site"), 2)  # refused, answer lost to a reset
            else:
                self.assertIn(expected, status)
        held.pop(0).close()  # one leaves: a place is free again
        for _ in range(100):
            if deployment.gateway.tunnel_server.factory.waiting_for_hello.get("lab-site") < 2:
                break
            yield sleep(0.05)
        sock, status = yield deferToThread(
            upgrade_without_hello, deployment.gateway_port, deployment.pki.ca_path,
            "lab-site", "lab-site-pw")
        held.append(sock)
        self.assertIn(b"101", status)

    @defer.inlineCallbacks
    def test_all_connections(self):
        """Past the cap, a new connection to the tunnel port is closed at once."""
        import socket
        deployment = Deployment(self)
        yield deployment.start_gateway()
        deployment.gateway.tunnel_server.factory.handshakes.limit = 2
        held = []
        self.addCleanup(lambda: [sock.close() for sock in held])

        def connect():
            sock = socket.create_connection(("127.0.0.1", deployment.gateway_port), timeout=5)
            held.append(sock)
            return sock

        for _ in range(2):
            yield deferToThread(connect)

        def connect_and_read():
            # The gateway may close the third connection so fast that the
            # reset already reaches connect(); either way it is not held.
            try:
                return connect().recv(10)
            except ConnectionResetError:
                return b""

        got = yield deferToThread(connect_and_read)
        self.assertEqual(got, b"")  # closed by the gateway (or reset), not held
        self.assertEqual(deployment.gateway.tunnel_server.factory.handshakes.count, 2)
