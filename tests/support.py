"""
Loopback fixtures for end-to-end tests: a test PKI, target servers, a static
resolver, and an in-process gateway + client deployment built from YAML the
same way twistd builds it.  Everything listens on 127.0.0.1 (or ::1), port 0.
"""

import base64
import hashlib
import os
import struct

import trustme
import txaio
import yaml
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IHostnameResolver, IHostResolution
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from anyproxy.client.app import make_client_service
from anyproxy.config.model import LOG_FORMATS, LogConfig
from anyproxy.config.load import load_config
from anyproxy.gateway.app import make_gateway_service
from anyproxy.logs import apply_library_levels, make_observer

PROXY_USER = "alice"
PROXY_PASSWORD = "s3cret-proxy-pw"
CLIENT_USER = "tunnel-user"
CLIENT_PASSWORD = "s3cret-tunnel-pw"


# -- certificates -------------------------------------------------------------

class TestPKI:
    """A throwaway CA with a gateway certificate for localhost/127.0.0.1/::1."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.ca = trustme.CA()
        self.directory = directory
        self.ca_path = self._write("ca.crt", self.ca.cert_pem.bytes())
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.cert_path = self._write("server.crt", b"".join(b.bytes() for b in cert.cert_chain_pems))
        self.key_path = self._write("server.key", cert.private_key_pem.bytes())
        self.server_cert = cert

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


# -- name resolution ----------------------------------------------------------

@implementer(IHostResolution)
class Resolution:
    """The C{IHostResolution} a fake resolver hands out."""

    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class StaticResolver:
    """Resolves a fixed table of names, so tests never send a DNS packet."""

    def __init__(self, table=None):
        self.table = table or {"localhost": ["127.0.0.1"], "target.test": ["127.0.0.1"],
                               "v6.test": ["::1"]}
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        resolution = Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for ip in self.table.get(hostName.lower(), []):
            cls = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(cls("TCP", ip, portNumber))
        receiver.resolutionComplete()
        return resolution


# -- targets ------------------------------------------------------------------

@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes; on EOF it finishes sending what it echoed, then closes."""

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        # A plain Protocol would be closed at once on EOF, throwing away
        # echoes still in its write buffer.
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(protocol.Protocol):
    """Reads until the peer half-closes, then answers with the SHA-256 of it all."""

    def connectionMade(self):
        self.digest = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data):
        self.digest.update(data)
        self.count += len(data)

    def readConnectionLost(self):
        self.transport.write(b"%d %s\n" % (self.count, self.digest.hexdigest().encode()))
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def blob(size):
    """Deterministic test content of C{size} bytes."""
    block = hashlib.sha256(b"anyproxy").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


class BlobResource(resource.Resource):
    """GET /blob/N -> N bytes of L{blob}; POST /upload -> sha256 of the body."""

    isLeaf = True

    def render_GET(self, request):
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "blob" and len(parts) == 2:
            request.setHeader(b"content-type", b"application/octet-stream")
            return blob(int(parts[1]))
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the target\n"

    def render_POST(self, request):
        body = request.content.read()
        return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())

    render_PUT = render_POST


def listen_tcp(testcase, factory, interface="127.0.0.1"):
    """Listen on C{interface} port 0; the port is closed at cleanup."""
    port = reactor.listenTCP(0, factory, interface=interface)
    testcase.addCleanup(port.stopListening)
    return port


def web_site():
    return server.Site(BlobResource())


# -- deployment ---------------------------------------------------------------

def _merge(base, overrides):
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _secrets():
    pairs = [(PROXY_USER, PROXY_PASSWORD), (CLIENT_USER, CLIENT_PASSWORD)]
    tokens = [base64.b64encode(("%s:%s" % pair).encode()).decode() for pair in pairs]
    return [PROXY_PASSWORD, CLIENT_PASSWORD] + tokens


class SecretWatch:
    """
    Records every log event emitted while a test runs, and fails the test if
    a test password or Basic token appears in any of them (formatted or raw).
    """

    def __init__(self, testcase, secrets=None):
        self.testcase = testcase
        self.secrets = secrets or _secrets()
        self.events = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(self.check)
        # Autobahn's debug lines (its dumps of the tunnel's opening handshake,
        # Authorization included) are made only at debug: watch those too.
        previous = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        testcase.addCleanup(txaio.set_global_log_level, previous)

    def __call__(self, event):
        self.events.append(event)

    def check(self):
        globalLogPublisher.removeObserver(self)
        for event in self.events:
            text = "%s %r" % (formatEvent(event), event)
            for secret in self.secrets:
                if secret in text:
                    self.testcase.fail("a secret was logged: %s" % (formatEvent(event)[:300],))


def basic_token(username, password):
    """The base64 part of a Basic credential, as it travels in a header."""
    return base64.b64encode(("%s:%s" % (username, password)).encode()).decode()


class ProgramLogs:
    """
    The programs' own log pipeline at C{level} (default debug) for one test:
    an observer per C{log.format} (text, JSON) built by
    L{anyproxy.logs.make_observer}, writing files, plus Autobahn's (txaio)
    level set the way twistd startup sets it.  Every event in the process
    reaches them, Autobahn's handshake dumps included.

    At cleanup (or on L{assert_clean}) the test fails if any of C{secrets}
    appears in a written file or in a raw event (formatted or its C{repr}):
    the raw events are what any other observer, twistd's own included,
    would see.  Use it in any end-to-end test::

        logs = ProgramLogs(self)
        ...
        logs.assert_clean()   # optional; cleanup checks too
    """

    def __init__(self, testcase, level="debug", secrets=None):
        self.testcase = testcase
        self.secrets = list(secrets or _secrets())
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
        self.paths = [os.path.join(directory, "anyproxy-%s.log" % (each,)) for each in LOG_FORMATS]
        self.observers = [make_observer(LogConfig(level=level, format=each, file=path))
                          for each, path in zip(LOG_FORMATS, self.paths)]
        self.events = []
        previous = txaio.get_global_log_level()
        for observer in self.observers + [self.events.append]:
            globalLogPublisher.addObserver(observer)
        apply_library_levels(LogConfig(level=level))
        testcase.addCleanup(self._stop, previous)

    def _stop(self, previous):
        txaio.set_global_log_level(previous)
        for observer in self.observers + [self.events.append]:
            globalLogPublisher.removeObserver(observer)
        for observer in self.observers:
            observer.stream.close()
        self.assert_clean()

    def text(self):
        """Everything written so far, all formats."""
        texts = []
        for path in self.paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return "\n".join(texts)

    def assert_clean(self):
        """Fail the test if a secret was written or emitted."""
        written = self.text()
        for secret in self.secrets:
            if secret in written:
                line = [each for each in written.splitlines() if secret in each][0]
                self.testcase.fail("a secret was written to the log: %s" % (line[:300],))
        for event in list(self.events):
            raw = "%s %r" % (formatEvent(event), event)
            for secret in self.secrets:
                if secret in raw:
                    self.testcase.fail("a secret reached the log publisher: %s" % (raw[:300],))


class Deployment:
    """
    A gateway and clients running in this process on loopback.

    Build configs as YAML dicts (the same path twistd takes), start the
    services, and stop everything at test cleanup.
    """

    def __init__(self, testcase):
        self.testcase = testcase
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.pki = TestPKI(os.path.join(self.directory, "pki"))
        self.resolver = StaticResolver()
        SecretWatch(testcase)
        self.gateway = None
        self.clients = []
        self._configs = 0

    def write_config(self, data):
        self._configs += 1
        path = os.path.join(self.directory, "config-%d.yaml" % (self._configs,))
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    def gateway_config(self, **overrides):
        data = {
            "proxy": {
                "socks5": {"listen_addr": "127.0.0.1:0", "auth_username": PROXY_USER,
                           "auth_password": PROXY_PASSWORD},
                "http": {"listen_addr": "127.0.0.1:0", "auth_username": PROXY_USER,
                         "auth_password": PROXY_PASSWORD},
            },
            "gateway": {
                "listen_addr": "127.0.0.1:0", "tls_cert": self.pki.cert_path,
                "tls_key": self.pki.key_path, "auth_username": CLIENT_USER,
                "auth_password": CLIENT_PASSWORD, "no_tunnel_wait": 0.5,
                "ping_interval": 5,
            },
        }
        return _merge(data, overrides)

    def client_config(self, **overrides):
        data = {
            "client": {
                "gateway_addr": "127.0.0.1:%d" % (self.gateway_port,),
                "gateway_tls_cert": self.pki.ca_path, "client_id": "client-1",
                "auth_username": CLIENT_USER, "auth_password": CLIENT_PASSWORD,
                "connect_timeout": 2, "reconnect_initial_delay": 0.1,
                "reconnect_max_delay": 0.5, "ping_interval": 5,
            },
        }
        return _merge(data, overrides)

    @defer.inlineCallbacks
    def start_gateway(self, **overrides):
        """Start a gateway; returns its L{anyproxy.gateway.app.Gateway} (ports in self.*_port)."""
        config = load_config(self.write_config(self.gateway_config(**overrides)))
        service = make_gateway_service(config, reactor)
        service.startService()
        self.testcase.addCleanup(service.stopService)
        for listener in service.listeners.values():
            yield listener.when_listening()
        self.gateway = service
        self.gateway_port = self._port("tunnel server")
        self.socks_port = self._port("socks5 proxy")
        self.http_port = self._port("http proxy")
        return service

    def _port(self, name):
        listener = self.gateway.listeners.get(name)
        return listener.port.getHost().port if listener is not None else None

    @defer.inlineCallbacks
    def start_client(self, wait=True, group="default", **overrides):
        """Start a client; by default wait until its tunnel is registered."""
        config = load_config(self.write_config(self.client_config(**overrides)))
        service, factories = make_client_service(config, reactor, resolver=self.resolver)
        service.startService()
        self.testcase.addCleanup(service.stopService)
        service.factories = factories
        self.clients.append(service)
        if wait:
            yield self.wait_for_tunnel(group)
        return service

    def wait_for_tunnel(self, group="default", timeout=10):
        return self.gateway.tunnel_pool.wait_for(group, timeout)


def run_curl(*args, env=None):
    """Run curl; a Deferred firing with C{(stdout, stderr, exit code)}."""
    env = dict(env or {})
    env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    return getProcessOutputAndValue("curl", ("--silent", "--show-error", "--max-time", "30") + args,
                                    env=env)


def recv_exactly(sock, size):
    """C{size} bytes from the blocking socket C{sock}; EOFError if it closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("closed after %r" % (data,))
        data += chunk
    return data


def binary_frame(payload):
    """One unmasked binary frame (FIN, opcode 2), as the tunnel writes it."""
    length = len(payload)
    if length < 126:
        return bytes((0x82, length)) + payload
    if length < 0x10000:
        return struct.pack("!BBH", 0x82, 126, length) + payload
    return struct.pack("!BBQ", 0x82, 127, length) + payload
