# -*- test-case-name: tests.test_tls -*-
"""
Tests for L{anyproxy.tls} and the demo certificate tool C{certs/generate.py}.

The handshake tests use the real reactor on 127.0.0.1, port 0.  Each one
waits until both ends of its connection have closed and stops its listener,
so no test leaves sockets behind.
"""

import contextlib
import importlib.util
import io
import ipaddress
import os
import stat
from typing import Callable, NamedTuple, Optional

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import VerificationError
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from anyproxy.errors import ConfigError
from anyproxy.tls import (
    TLSFileError,
    client_tls_options,
    load_certificates,
    load_key_and_chain,
    server_tls_options,
)

_GENERATE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "certs",
    "generate.py",
)


def _load_generate_tool():
    """Import certs/generate.py, which is a script and not in a package."""
    spec = importlib.util.spec_from_file_location(
        "anyproxy_certs_generate", _GENERATE_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_tool = _load_generate_tool()

_PAYLOAD = b"hello through the tunnel\n"


@implementer(IHandshakeListener)
class _EchoServer(Protocol):
    """Echo everything back and record how the connection ended."""

    def connectionMade(self):
        self.peer_certificate = None

    def handshakeCompleted(self):
        self.peer_certificate = self.transport.getPeerCertificate()

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        # A Failure passed to callback() would errback; keep it as a value.
        self.reason = reason
        self.factory.connections.append(self)
        self.factory.lost.callback(self)


class _EchoServerFactory(Factory):
    protocol = _EchoServer

    def __init__(self):
        self.connections = []
        self.lost = Deferred()


@implementer(IHandshakeListener)
class _EchoClient(Protocol):
    """Send a payload, close once it has come back, record what happened."""

    def __init__(self):
        self.received = b""
        self.handshake_done = False
        self.tls_version = None
        self.lost = Deferred()

    def connectionMade(self):
        # Written before the handshake: TLS buffers it until keys exist.
        self.transport.write(_PAYLOAD)

    def handshakeCompleted(self):
        self.handshake_done = True
        self.tls_version = self.transport.getHandle().get_protocol_version_name()

    def dataReceived(self, data):
        self.received += data
        if self.received == _PAYLOAD:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(self)


class _Outcome:
    """What one connection attempt did, seen from both ends."""

    def __init__(self, client, client_reason, server, server_reason):
        self.client = client
        self.client_reason = client_reason
        self.server = server
        self.server_reason = server_reason

    @property
    def echoed(self):
        return self.client.received == _PAYLOAD


@implementer(IOpenSSLClientConnectionCreator)
class _OldTLSClientOptions:
    """
    A client that speaks TLS 1.1 at most and trusts anything.

    Security level 0 lets OpenSSL actually send a TLS 1.1 ClientHello, so the
    refusal under test comes from the server and not from the client's own
    library.
    """

    def clientConnectionForTLS(self, tls_protocol):
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"ALL:@SECLEVEL=0")
        return SSL.Connection(context, None)


def _write(path, data, mode=0o600):
    with open(path, "wb") as output:
        output.write(data)
    os.chmod(path, mode)
    return path


class TLSTests(TestCase):
    """
    Tests for L{server_tls_options} and L{client_tls_options}.
    """

    timeout = 30

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self._cas = {}
        self._outs = {}
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _trustme_server(self, ca, *identities):
        """Write a trustme-issued certificate chain and key; return paths."""
        leaf = ca.issue_cert(*identities)
        cert_path = _write(
            self._path("tm-server.crt"),
            b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
            0o644,
        )
        key_path = _write(self._path("tm-server.key"),
                          leaf.private_key_pem.bytes())
        return cert_path, key_path

    def _generated(self, name="gen", client_name=None, hosts=None):
        """Run certs/generate.py into a fresh directory; return its path."""
        out = os.path.join(self.directory, name)
        generate_tool.generate(
            out, hosts or generate_tool.DEFAULT_HOSTS, client_name
        )
        return out

    # Named certificates for the handshake table: each name is made on its
    # first use in a test, so two columns of one row can share a CA.

    def _ca(self, name):
        """The trustme CA called C{name} in this test."""
        if name not in self._cas:
            self._cas[name] = trustme.CA()
        return self._cas[name]

    def _trusting(self, *ca_names):
        """A trust file holding the named trustme CAs."""
        return _write(
            self._path("tm-%s.crt" % "-".join(ca_names)),
            b"".join(self._ca(name).cert_pem.bytes() for name in ca_names),
            0o644,
        )

    def _trustme_options(self, ca_name, *identities, intermediate=False,
                         client_ca=None):
        """Server options for a certificate issued by the named CA (or by
        an intermediate CA under it), for C{identities}."""
        ca = self._ca(ca_name)
        if intermediate:
            ca = ca.create_child_ca()
        cert_path, key_path = self._trustme_server(ca, *identities)
        return server_tls_options(cert_path, key_path, client_ca_path=client_ca)

    def _trustme_client(self, ca_name, identity):
        """A combined key + certificate PEM file issued by the named CA."""
        client = self._ca(ca_name).issue_cert(identity)
        return _write(self._path("tm-client.pem"),
                      client.private_key_and_cert_chain_pem.bytes())

    def _gen(self, name, filename, **generate):
        """A file of the generate.py directory C{name} (run on first use,
        with C{generate}'s client_name and hosts)."""
        if name not in self._outs:
            self._outs[name] = self._generated(name, **generate)
        return os.path.join(self._outs[name], filename)

    def _gen_options(self, name="gen", client_ca=False, **generate):
        """Server options for the generate.py directory C{name}; with
        C{client_ca}, its CA must have signed the client's certificate."""
        return server_tls_options(
            self._gen(name, "server.crt", **generate),
            self._gen(name, "server.key"),
            client_ca_path=self._gen(name, "ca.crt") if client_ca else None,
        )

    def _gen_client(self, server_name="localhost", trust=("gen", "ca.crt"),
                    identity=None, **generate):
        """
        Client options trusting a file of a generate.py directory.

        @param identity: C{(directory, "client" or "server")}: present that
            pair of the directory (run with C{generate} on first use).
        """
        extra = {}
        if identity is not None:
            where, pair = identity
            extra = dict(
                client_cert_path=self._gen(where, pair + ".crt", **generate),
                client_key_path=self._gen(where, pair + ".key"),
            )
        return client_tls_options(server_name, self._gen(*trust), **extra)

    @inlineCallbacks
    def _connect(self, server_options, client_options):
        """
        Serve an echo protocol with C{server_options} on 127.0.0.1, connect
        one client with C{client_options}, and wait until both ends closed.
        """
        factory = _EchoServerFactory()
        port = reactor.listenSSL(0, factory, server_options,
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, client_options
        )
        client = yield connectProtocol(endpoint, _EchoClient())
        client, server = yield gatherResults([client.lost, factory.lost])
        return _Outcome(client, client.reason, server, server.reason)

    def _assert_echoed(self, outcome):
        self.assertTrue(outcome.client.handshake_done)
        self.assertEqual(outcome.client.received, _PAYLOAD)
        self.assertIn(outcome.client.tls_version, ("TLSv1.2", "TLSv1.3"))

    def _assert_refused(self, outcome, *errors):
        self.assertFalse(outcome.echoed)
        self.assertTrue(
            outcome.client_reason.check(*errors),
            "unexpected reason: %r" % (outcome.client_reason.value,),
        )

    def test_malformed_certificate_pem(self):
        """A malformed PEM certificate raises an error naming the file."""
        cert_path = _write(
            self._path("bad.crt"),
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n"
            b"-----END CERTIFICATE-----\n",
        )
        out = self._generated()
        error = self.assertRaises(
            TLSFileError, server_tls_options,
            cert_path, os.path.join(out, "server.key"),
        )
        self.assertIn(cert_path, str(error))
        self.assertIn("malformed", str(error))
        self.assertIsInstance(error, ValueError)
        self.assertIsInstance(error, ConfigError)

    def test_malformed_trust_file(self):
        """A trust file without a certificate raises an error naming it."""
        bad = _write(self._path("ca.crt"), b"this is not PEM at all\n")
        error = self.assertRaises(
            TLSFileError, client_tls_options, "localhost", bad
        )
        self.assertIn(bad, str(error))

    def test_malformed_key_pem(self):
        """A malformed PEM private key raises an error naming the file."""
        out = self._generated()
        key_path = _write(
            self._path("bad.key"),
            # Not a key: a malformed body in key armour (split so that
            # scans for committed private keys don't flag this test).
            b"-----BEGIN " + b"PRIVATE KEY-----\nAAAA\n-----END " + b"PRIVATE KEY-----\n",
        )
        error = self.assertRaises(
            TLSFileError, server_tls_options,
            os.path.join(out, "server.crt"), key_path,
        )
        self.assertIn(key_path, str(error))
        self.assertIn("malformed", str(error))

    def test_missing_file(self):
        """A missing file raises an error naming it."""
        missing = self._path("nope.crt")
        error = self.assertRaises(
            TLSFileError, client_tls_options, "localhost", missing
        )
        self.assertIn(missing, str(error))

    def test_key_does_not_match_certificate(self):
        """A key from another pair raises an error naming both files."""
        one, two = self._generated("one"), self._generated("two")
        cert_path = os.path.join(one, "server.crt")
        key_path = os.path.join(two, "server.key")
        error = self.assertRaises(
            TLSFileError, server_tls_options, cert_path, key_path
        )
        self.assertIn(cert_path, str(error))
        self.assertIn(key_path, str(error))
        self.assertIn("does not match", str(error))

    def test_chain_in_wrong_order(self):
        """A chain file whose leaf is not first says which one the key fits."""
        out = self._generated()
        with open(os.path.join(out, "server.crt"), "rb") as leaf:
            with open(os.path.join(out, "ca.crt"), "rb") as ca:
                reordered = _write(self._path("reordered.crt"),
                                   ca.read() + leaf.read(), 0o644)
        error = self.assertRaises(
            TLSFileError, load_key_and_chain,
            reordered, os.path.join(out, "server.key"),
        )
        self.assertIn("#2", str(error))

    def test_encrypted_key(self):
        """An encrypted private key raises an error that says so."""
        out = self._generated()
        with open(os.path.join(out, "server.key"), "rb") as pem:
            key = serialization.load_pem_private_key(pem.read(), None)
        key_path = _write(self._path("encrypted.key"), key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        error = self.assertRaises(
            TLSFileError, server_tls_options,
            os.path.join(out, "server.crt"), key_path,
        )
        self.assertIn(key_path, str(error))
        self.assertIn("encrypted", str(error))

    def test_client_key_without_certificate(self):
        """A client key without a client certificate is a clear error."""
        out = self._generated(client_name="client1")
        key_path = os.path.join(out, "client.key")
        error = self.assertRaises(
            TLSFileError, client_tls_options, "localhost",
            os.path.join(out, "ca.crt"), client_key_path=key_path,
        )
        self.assertIn(key_path, str(error))

    def test_empty_server_name(self):
        """An empty server name is refused."""
        out = self._generated()
        self.assertRaises(ValueError, client_tls_options, "",
                          os.path.join(out, "ca.crt"))


class _Handshake(NamedTuple):
    """
    One row of the handshake table: L{TLSTests} gets a C{test_<name>}
    method that connects a client made by C{client} to a server made by
    C{server} (each called with the test) and checks the outcome.
    """

    doc: str
    server: Callable
    client: Callable
    # The client's connection fails with one of these; () means the payload
    # is echoed over TLS 1.2 or newer.
    refused: tuple = ()
    # If not None, the server's end fails with an SSL.Error whose text
    # contains this.
    server_error: Optional[str] = None
    # More assertions: called with the test and the L{_Outcome}.
    check: Optional[Callable] = None


def _no_handshake(test, outcome):
    test.assertFalse(outcome.client.handshake_done)


def _chain_of_two_sent(test, outcome):
    test.assertEqual(len(load_certificates(test._path("tm-server.crt"))), 2)


def _no_client_certificate_seen(test, outcome):
    test.assertIsNone(outcome.server.peer_certificate)


def _client1_seen(test, outcome):
    seen = outcome.server.peer_certificate.to_cryptography()
    test.assertEqual(
        seen.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
        "client1",
    )


def _a_client_certificate_seen(test, outcome):
    test.assertIsNotNone(outcome.server.peer_certificate)


def _warned_once(test, outcome):
    warnings = [event for event in test.events
                if event.get("log_level") == LogLevel.warn
                and "VERIFICATION IS DISABLED" in event["log_format"]]
    test.assertEqual(len(warnings), 1)


_NAME_REFUSED = (VerificationError, SSL.Error)

HANDSHAKES = {
    "trustme_right_ca_connects": _Handshake(
        "A client trusting the CA of a trustme certificate echoes data.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: client_tls_options("localhost", t._trusting("ca"))),
    "generated_right_ca_connects": _Handshake(
        "A client trusting ca.crt from generate.py echoes data.",
        lambda t: t._gen_options(),
        lambda t: t._gen_client()),
    "trustme_other_ca_fails": _Handshake(
        "A client trusting a different CA refuses the server.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: client_tls_options("localhost", t._trusting("other")),
        refused=(SSL.Error,), check=_no_handshake),
    "generated_other_ca_fails": _Handshake(
        "A client trusting another generate.py CA refuses the server.",
        lambda t: t._gen_options("one"),
        lambda t: t._gen_client(trust=("two", "ca.crt")),
        refused=(SSL.Error,)),
    "trust_file_with_several_certificates": _Handshake(
        "A trust file holding several CAs trusts each of them.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: client_tls_options("localhost", t._trusting("other", "ca"))),
    "pinned_gateway_certificate": _Handshake(
        "Trusting the gateway's own CA-issued certificate is enough.",
        lambda t: t._gen_options(),
        lambda t: t._gen_client(trust=("gen", "server.crt"))),
    "intermediate_chain_is_sent": _Handshake(
        "A cert file with an intermediate verifies against the root alone.",
        lambda t: t._trustme_options("root", "localhost", intermediate=True),
        lambda t: client_tls_options("localhost", t._trusting("root")),
        check=_chain_of_two_sent),
    "wrong_server_name_fails": _Handshake(
        "A server name that is not in the certificate is refused.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: client_tls_options("gateway.example.com", t._trusting("ca")),
        refused=_NAME_REFUSED),
    "ip_san_verifies": _Handshake(
        "The server name 127.0.0.1 matches an IP subjectAltName.",
        lambda t: t._gen_options(),
        lambda t: t._gen_client("127.0.0.1")),
    "ipv6_san_verifies": _Handshake(
        "A bracketed IPv6 server name matches an IPv6 subjectAltName.",
        lambda t: t._gen_options(),
        lambda t: t._gen_client("[::1]")),
    "ip_not_in_certificate_fails": _Handshake(
        "An IP address missing from the certificate's SANs is refused.",
        lambda t: t._trustme_options("ca", "localhost", "127.0.0.1"),
        lambda t: client_tls_options("127.0.0.2", t._trusting("ca")),
        refused=_NAME_REFUSED),
    "dns_name_does_not_match_ip_san": _Handshake(
        "A DNS name spelled like a SAN IP is not accepted as that IP.",
        lambda t: t._gen_options(hosts=["127.0.0.1"]),
        lambda t: t._gen_client(),
        refused=_NAME_REFUSED),
    "tls11_client_refused": _Handshake(
        "The server refuses a client that offers at most TLS 1.1.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: _OldTLSClientOptions(),
        refused=(SSL.Error,), server_error="protocol"),
    "mutual_tls_without_client_certificate_refused": _Handshake(
        "With client_ca set, a client without a certificate is refused.",
        lambda t: t._gen_options(client_ca=True, client_name="client1"),
        lambda t: t._gen_client(),
        refused=(SSL.Error,), server_error="certificate",
        check=_no_client_certificate_seen),
    "mutual_tls_with_ca_signed_client_certificate": _Handshake(
        "With client_ca set, a client with a CA-signed certificate is let in.",
        lambda t: t._gen_options(client_ca=True, client_name="client1"),
        lambda t: t._gen_client(identity=("gen", "client")),
        check=_client1_seen),
    "mutual_tls_with_trustme_client_certificate": _Handshake(
        "A trustme client certificate in one combined PEM file is let in.",
        lambda t: t._trustme_options("ca", "localhost",
                                     client_ca=t._trusting("ca")),
        lambda t: client_tls_options(
            "localhost", t._trusting("ca"),
            client_cert_path=t._trustme_client("ca", "client@example.com")),
        check=_a_client_certificate_seen),
    "mutual_tls_with_other_ca_client_certificate_refused": _Handshake(
        "A client certificate from a CA the gateway does not trust fails.",
        lambda t: t._gen_options(client_ca=True),
        lambda t: t._gen_client(identity=("stranger", "client"),
                                client_name="mallory"),
        refused=(SSL.Error,), server_error=""),
    "mutual_tls_server_certificate_as_client_refused": _Handshake(
        "A CA-signed certificate without clientAuth usage is refused.",
        lambda t: t._gen_options(client_ca=True),
        lambda t: t._gen_client(identity=("gen", "server")),
        refused=(SSL.Error,)),
    "insecure_connects_to_untrusted_server_and_warns": _Handshake(
        "insecure=True skips verification and logs a warning.",
        lambda t: t._trustme_options("ca", "localhost"),
        lambda t: client_tls_options("gateway.example.com", None,
                                     insecure=True),
        check=_warned_once),
}


def _handshake_test(name, case):
    @inlineCallbacks
    def test(self):
        outcome = yield self._connect(case.server(self), case.client(self))
        if case.refused:
            self._assert_refused(outcome, *case.refused)
        else:
            self._assert_echoed(outcome)
        if case.server_error is not None:
            self.assertTrue(outcome.server_reason.check(SSL.Error))
            self.assertIn(case.server_error, str(outcome.server_reason.value))
        if case.check is not None:
            case.check(self, outcome)

    test.__name__ = test.__qualname__ = "test_" + name
    test.__doc__ = case.doc
    return test


for _name, _case in HANDSHAKES.items():
    setattr(TLSTests, "test_" + _name, _handshake_test(_name, _case))


class CertificateToolTests(TestCase):
    """
    Tests for C{certs/generate.py}.
    """

    def setUp(self):
        self.out = self.mktemp()

    def _load(self, name):
        with open(os.path.join(self.out, name), "rb") as pem:
            return x509.load_pem_x509_certificate(pem.read())

    def _mode(self, name):
        return stat.S_IMODE(os.stat(os.path.join(self.out, name)).st_mode)

    def test_writes_ca_and_server_pair(self):
        """The CA and the server pair are written, keys with mode 0600."""
        actions = generate_tool.generate(self.out, ["localhost"])
        self.assertEqual(
            sorted(actions),
            sorted((name, generate_tool.WRITTEN) for name in
                   ["ca.crt", "ca.key", "server.crt", "server.key"]),
        )
        self.assertEqual(self._mode("ca.key"), 0o600)
        self.assertEqual(self._mode("server.key"), 0o600)
        self.assertFalse(os.path.exists(os.path.join(self.out, "client.crt")))

    def test_server_alt_names(self):
        """DNS names and IP addresses become the matching SAN entries."""
        generate_tool.generate(self.out,
                               ["gw.example.com", "127.0.0.1", "::1"])
        names = self._load("server.crt").extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName),
                         ["gw.example.com"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        usage = self._load("server.crt").extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_client_certificate(self):
        """--client makes a clientAuth certificate signed by the CA."""
        generate_tool.generate(self.out, ["localhost"], client_name="lab-1")
        client, ca = self._load("client.crt"), self._load("ca.crt")
        self.assertEqual(client.issuer, ca.subject)
        client.verify_directly_issued_by(ca)
        usage = client.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(self._mode("client.key"), 0o600)
        key, chain = load_key_and_chain(os.path.join(self.out, "client.crt"),
                                        os.path.join(self.out, "client.key"))
        self.assertEqual(len(chain), 1)

    def test_existing_files_kept(self):
        """A second run keeps every file, and a later client uses the old CA."""
        generate_tool.generate(self.out, ["localhost"])
        before = self._load("server.crt")
        actions = generate_tool.generate(self.out, ["localhost"], "late")
        self.assertEqual(self._load("server.crt"), before)
        self.assertIn(("server.crt", generate_tool.KEPT), actions)
        self.assertIn(("client.crt", generate_tool.WRITTEN), actions)
        self._load("client.crt").verify_directly_issued_by(self._load("ca.crt"))

    def test_force_replaces(self):
        """--force writes a new CA and new certificates."""
        generate_tool.generate(self.out, ["localhost"])
        ca_before = self._load("ca.crt")
        actions = generate_tool.generate(self.out, ["localhost"], force=True)
        self.assertNotEqual(self._load("ca.crt"), ca_before)
        self.assertEqual({action for _, action in actions},
                         {generate_tool.WRITTEN})

    def test_half_pair_refused(self):
        """A certificate whose key is missing stops the run without --force."""
        generate_tool.generate(self.out, ["localhost"])
        os.remove(os.path.join(self.out, "server.key"))
        self.assertRaises(ValueError, generate_tool.generate, self.out,
                          ["localhost"])

    def test_main_prints_what_it_did(self):
        """The command line prints one line per file, written or kept."""
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = generate_tool.main(["--out", self.out,
                                         "--hosts", "localhost"])
        self.assertEqual(status, 0)
        self.assertEqual(buffer.getvalue().count("wrote"), 4)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            generate_tool.main(["--out", self.out])
        self.assertEqual(buffer.getvalue().count("kept"), 4)
