# -*- test-case-name: tests.test_client_access -*-
"""
Tests for L{anyproxy.gateway.client_access}: which grant each client
credential gets, and what the tunnel server lets a grant announce.
"""

import datetime

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.auth import GroupLogins
from anyproxy.config.model import ClientEntryConfig, GatewayConfig
from anyproxy.errors import ConfigError, HelloRefused
from anyproxy.gateway.client_access import (
    SHARED, SHARED_CERTIFICATE, ClientCredentials, certificate_subjects)
from anyproxy.gateway.tunnel_pool import TunnelPool
from anyproxy.gateway.tunnel_server import TunnelServerFactory
from anyproxy.tunnel import frames
from tests.test_config import ConfigTestMixin
from tests.test_gateway_hello import FakeProtocol, hello


def gateway(**kwargs):
    defaults = dict(endpoint="tcp:0", tls_cert="c", tls_key="k")
    defaults.update(kwargs)
    return GatewayConfig(**defaults)


SITE_A = ClientEntryConfig(username="site-a", password="a-pw", groups=("lab", "ops"),
                           client_ids=("site-a*",), max_tunnels=2)
CERT_B = ClientEntryConfig(subject="site-b.clients.test", groups=("lab",), max_tunnels=4)


class GrantTests(SynchronousTestCase):
    """Which grant a password or a certificate gets."""

    def test_shared_credential_serves_default_only(self):
        """auth_username/auth_password gets the shared grant: group default, by default."""
        credentials = ClientCredentials.from_config(gateway(auth_username="u", auth_password="p"))
        grant = credentials.grant_for([], ("u", "p"))
        self.assertEqual((grant.name, grant.groups), (SHARED, ("default",)))
        self.assertTrue(grant.allows_group("default"))
        self.assertFalse(grant.allows_group("lab"))

    def test_auth_groups(self):
        """auth_groups widens the shared grant; '*' allows every group."""
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", auth_groups=("*",)))
        self.assertTrue(credentials.grant_for([], ("u", "p")).allows_group("anything"))

    def test_wrong_or_unknown_refused(self):
        """A wrong password, an unknown name or no credentials get no grant."""
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", clients=(SITE_A,)))
        for offered in [("u", "x"), ("site-a", "p"), ("nobody", "a-pw"), ("u", ""), None]:
            self.assertIsNone(credentials.grant_for([], offered), offered)

    def test_client_entry(self):
        """A clients entry's password gets that entry's groups, ids and cap."""
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", clients=(SITE_A,)))
        grant = credentials.grant_for([], ("site-a", "a-pw"))
        self.assertEqual((grant.name, grant.groups, grant.max_tunnels),
                         ("site-a", ("lab", "ops"), 2))
        self.assertTrue(grant.allows_client_id("site-a-01"))
        self.assertFalse(grant.allows_client_id("site-b-01"))
        self.assertFalse(grant.allows_group("default"))

    def test_certificate_subject(self):
        """With client_ca, a subject entry's certificate needs no password."""
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", client_ca="/ca.crt", clients=(CERT_B,)))
        grant = credentials.grant_for(["x", "site-b.clients.test"], None)
        self.assertEqual(grant.name, "subject:site-b.clients.test")
        # Another certificate still needs the shared password, and gets the shared grant.
        self.assertIsNone(credentials.grant_for(["other.clients.test"], None))
        self.assertEqual(credentials.grant_for(["other.clients.test"], ("u", "p")).name, SHARED)

    def test_subject_ignored_without_client_ca(self):
        """Subjects count only when TLS verified the certificate (client_ca)."""
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", clients=(CERT_B,)))
        self.assertIsNone(credentials.grant_for(["site-b.clients.test"], None))

    def test_certificate_only(self):
        """client_ca without auth_username: any verified certificate is the shared credential."""
        credentials = ClientCredentials.from_config(gateway(client_ca="/ca.crt"))
        self.assertEqual(credentials.grant_for(["anyone"], None).name, SHARED_CERTIFICATE)
        self.assertIsNone(credentials.grant_for([], None))

    def test_repr_hides_passwords(self):
        credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="shared-secret", clients=(SITE_A,)))
        self.assertNotIn("secret", repr(credentials))
        self.assertNotIn("a-pw", repr(credentials))


class CertificateSubjectsTests(SynchronousTestCase):
    """The names a certificate offers: common name, then DNS and URI alternative names."""

    def test_names(self):
        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("site-a.clients.test"),
                    x509.UniformResourceIdentifier("spiffe://corp/site-a")]), critical=False)
                .sign(key, None))
        self.assertEqual(certificate_subjects(cert),
                         ["site-a", "site-a.clients.test", "spiffe://corp/site-a"])

    def test_pyopenssl(self):
        """A pyOpenSSL certificate (what TLS transports give) works too."""
        cert = trustme.CA().issue_cert("site-b.clients.test", common_name="site-b")
        loaded = crypto.load_certificate(crypto.FILETYPE_PEM, cert.cert_chain_pems[0].bytes())
        self.assertEqual(certificate_subjects(loaded), ["site-b", "site-b.clients.test"])

    def test_none(self):
        self.assertEqual(certificate_subjects(None), [])


class HelloGrantTests(SynchronousTestCase):
    """The tunnel server checks each HELLO against the credential's grant."""

    def setUp(self):
        self.registry = TunnelPool(Clock())
        self.logins = GroupLogins()
        self.credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", clients=(SITE_A,)))
        self.factory = TunnelServerFactory(self.registry, self.credentials, Clock(),
                                           group_logins=self.logins)

    def protocol(self, name):
        protocol = FakeProtocol()
        protocol.grant = self.credentials.grant_named(name)
        return protocol

    def refused(self, name, **extra):
        with self.assertRaises(HelloRefused) as caught:
            self.factory.tunnel_connected(self.protocol(name), hello(**extra))
        return caught.exception

    def test_group_not_allowed(self):
        """A group outside the grant is refused with 4003 and a reason naming both."""
        refused = self.refused(SHARED, group="lab", weight=10000)
        self.assertEqual(refused.code, frames.CLOSE_NOT_ALLOWED)
        self.assertEqual(refused.reason, "credential 'gateway.auth_username' may not serve "
                                         "group 'lab' (it may serve: default); add it to "
                                         "gateway.auth_groups")
        self.assertEqual(self.registry.tunnels(), [])

    def test_minted_group_login_refused(self):
        """A refused HELLO's group_password is never a login."""
        self.refused(SHARED, group="lab", group_password="minted")
        self.assertEqual(self.logins.groups(), [])
        self.assertIsNone(self.logins.authenticate("lab", "minted"))

    def test_allowed_group(self):
        """The grant's groups are served; the legitimate group is unaffected by refusals."""
        self.refused(SHARED, group="lab")
        tunnel = self.factory.tunnel_connected(self.protocol("site-a"),
                                               hello(group="lab", client_id="site-a-1"))
        self.assertEqual((tunnel.group, tunnel.credential), ("lab", "site-a"))
        self.assertEqual(self.registry.pick("lab"), tunnel)

    def test_client_id_pattern(self):
        """A client id outside the grant's patterns is refused."""
        refused = self.refused("site-a", group="lab", client_id="site-b-1")
        self.assertEqual(refused.code, frames.CLOSE_NOT_ALLOWED)
        self.assertIn("client_id 'site-b-1'", refused.reason)

    def test_tiny_weight_refused(self):
        """Weights below 0.01 (1e-300 made a client invisible to balancing) are refused."""
        for weight in (1e-300, 0.009):
            refused = self.refused("site-a", group="lab", client_id="site-a-1", weight=weight)
            self.assertEqual(refused.code, frames.CLOSE_BAD_HELLO)

    def test_max_tunnels(self):
        """The third tunnel of a credential capped at 2 is refused with 4029; a slot frees."""
        first = self.factory.tunnel_connected(self.protocol("site-a"),
                                              hello(group="lab", client_id="site-a-1"))
        self.factory.tunnel_connected(self.protocol("site-a"),
                                      hello(group="ops", client_id="site-a-2"))
        refused = self.refused("site-a", group="lab", client_id="site-a-3")
        self.assertEqual(refused.code, frames.CLOSE_TOO_MANY_TUNNELS)
        # Other credentials are not counted against it.
        self.factory.tunnel_connected(self.protocol(SHARED), hello(group="default"))
        self.factory.tunnel_disconnected(first)
        self.factory.tunnel_connected(self.protocol("site-a"),
                                      hello(group="lab", client_id="site-a-3"))

    def test_still_allowed_after_reload(self):
        """A reload that narrows a grant makes its tunnels no longer allowed."""
        tunnel = self.factory.tunnel_connected(self.protocol("site-a"),
                                               hello(group="lab", client_id="site-a-1"))
        self.assertTrue(self.factory.still_allowed(tunnel))
        narrowed = ClientEntryConfig(username="site-a", password="a-pw", groups=("ops",))
        self.factory.credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p", clients=(narrowed,)))
        self.assertFalse(self.factory.still_allowed(tunnel))
        self.factory.credentials = ClientCredentials.from_config(gateway(
            auth_username="u", auth_password="p"))
        self.assertFalse(self.factory.still_allowed(tunnel))


class ClientsConfigTests(ConfigTestMixin, SynchronousTestCase):
    """gateway.clients, auth_groups and auth_max_tunnels in the config file."""

    BASE = ('gateway:\n  listen_addr: "127.0.0.1:8443"\n  tls_cert: "server.crt"\n'
            '  tls_key: "server.key"\n')

    def test_read(self):
        config = self.load(self.BASE + (
            "  clients:\n"
            "    - {username: site-a, password: a-pw, groups: [lab], client_ids: ['site-a*'],"
            " max_tunnels: 8}\n"
            "  auth_groups: [default, ops]\n"))
        [entry] = config.gateway.clients
        self.assertEqual((entry.username, entry.groups, entry.client_ids, entry.max_tunnels),
                         ("site-a", ("lab",), ("site-a*",), 8))
        self.assertEqual(config.gateway.auth_groups, ("default", "ops"))
        self.assertNotIn("a-pw", repr(config))

    def test_defaults(self):
        config = self.load(self.BASE + "  auth_username: u\n  auth_password: p\n"
                           "  clients: [{username: s, password: x}]\n")
        self.assertEqual(config.gateway.auth_groups, ("default",))
        self.assertEqual(config.gateway.auth_max_tunnels, 1024)
        self.assertEqual(config.gateway.clients[0].groups, ("default",))
        self.assertEqual(config.gateway.clients[0].max_tunnels, 256)

    def test_errors(self):
        for extra, prefix in [
            ("  clients: [{username: a}]\n", "gateway.clients[0].password: required"),
            ("  clients: [{password: a}]\n", "gateway.clients[0].username: set username"),
            ("  clients: [{username: a, password: b, subject: c}]\n",
             "gateway.clients[0].username: set username"),
            ("  clients: [{username: a, password: b}, {username: a, password: c}]\n",
             "gateway.clients[1].username: duplicate entry 'a'"),
            ("  clients: [{username: a, password: b, groups: []}]\n",
             "gateway.clients[0].groups: must not be empty"),
            ("  clients: [{username: a, password: b, groups: [3]}]\n",
             "gateway.clients[0].groups[0]: expected a group name"),
            ("  clients: [{username: a, password: b, max_tunnels: 0}]\n",
             "gateway.clients[0].max_tunnels: 0 is out of range"),
            ("  clients: [{username: a, password: b, colour: red}]\n",
             "gateway.clients[0].colour: unknown key"),
            ("  clients: [{subject: site-a}]\n", "gateway.clients: an entry with subject needs"),
            ("  auth_username: a\n  auth_password: b\n  clients: [{username: a, password: c}]\n",
             "gateway.clients[0].username: 'a' is also gateway.auth_username"),
            ("  auth_username: a\n  auth_password: b\n  auth_groups: []\n",
             "gateway.auth_groups: must not be empty"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.load(self.BASE + extra)
            self.assertIn(prefix, str(caught.exception), extra)

    def test_client_weight_minimum(self):
        with self.assertRaises(ConfigError) as caught:
            self.load('client:\n  gateway_addr: "127.0.0.1:8443"\n  weight: 0.001\n')
        self.assertIn("client.weight: must be at least 0.01", str(caught.exception))
