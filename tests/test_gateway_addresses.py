"""
Tests for L{anyproxy.client.gateway_endpoints}: a gateway name with several
addresses (Happy Eyeballs through C{HostnameEndpoint}, with a test resolver)
and C{srv:} gateways (DNS SRV records served by a C{twisted.names} server in
this process, on a free loopback UDP port), plus the config forms.
"""

import socket

from twisted.internet import defer, reactor, task
from twisted.names import client as dns_client, dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyproxy.client.app import make_client_service
from anyproxy.client.gateway_endpoints import rfc2782_order, srv_key
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError
from tests.support import Deployment, StaticResolver

SRV_NAME = "_anyproxy._tcp.corp.test"


class _Answers(ResolverBase):
    """A resolver answering SRV queries from a dict (name -> [Record_SRV])."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.asked = []

    def _lookup(self, name, cls, type, timeout):
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.asked.append((name, type))
        if type != dns.SRV or name not in self.records:
            return defer.fail(DomainError(name))
        answers = [dns.RRHeader(name=name, type=dns.SRV, ttl=60, payload=record, auth=True)
                   for record in self.records[name]]
        return defer.succeed((answers, [], []))


class RFC2782OrderTests(SynchronousTestCase):
    """The order SRV targets are tried in."""

    def record(self, priority, weight, target):
        return dns.Record_SRV(priority, weight, 8443, target)

    def test_priority_first(self):
        """Lower priorities come first whatever the weights."""
        records = [self.record(20, 100, "c"), self.record(10, 0, "a"), self.record(15, 1, "b")]
        self.assertEqual([host for host, _ in rfc2782_order(records, lambda: 0.99)],
                         ["a", "b", "c"])

    def test_weights(self):
        """Within a priority the first pick follows the weights (RFC 2782's running sum)."""
        records = [self.record(10, 1, "light"), self.record(10, 3, "heavy")]
        # total 4: a draw of 0..1 picks "light", 2..4 picks "heavy".
        self.assertEqual(rfc2782_order(records, lambda: 0.1)[0][0], "light")
        self.assertEqual(rfc2782_order(records, lambda: 0.5)[0][0], "heavy")
        picks = [rfc2782_order(records, lambda: i / 100.0)[0][0] for i in range(100)]
        self.assertEqual(picks.count("heavy"), 60)  # draws 2, 3, 4 of 0..4

    def test_weight_zero_rarely_first(self):
        """A weight-0 record is first only on a draw of 0, and is never lost."""
        records = [self.record(10, 0, "zero"), self.record(10, 9, "nine")]
        self.assertEqual(rfc2782_order(records, lambda: 0.0)[0][0], "zero")
        self.assertEqual([h for h, _ in rfc2782_order(records, lambda: 0.5)], ["nine", "zero"])


    def test_all_weights_zero_spread(self):
        """With every weight 0, any record may come first: clients do not all start at one."""
        import random
        draw = random.Random(7).random
        records = [self.record(10, 0, name) for name in ("a", "b", "c")]
        firsts = [rfc2782_order(records, draw)[0][0] for _ in range(300)]
        for name in ("a", "b", "c"):
            self.assertGreater(firsts.count(name), 50, name)


class SrvCancelTests(SynchronousTestCase):
    """Cancelling an SRV attempt stops it, whatever error the step in progress fails with."""

    def test_cancel_tries_no_further_target(self):
        from anyproxy.client.egress import EgressProxyError
        from anyproxy.client.gateway_endpoints import SrvEndpoint
        records = {SRV_NAME: [dns.Record_SRV(10, 0, 8443, name) for name in ("a", "b", "c")]}
        tried = []

        class Pending:
            def __init__(self, host):
                self.host = host

            def connect(self, factory):
                tried.append(self.host)
                # As the egress proxy's endpoint fails when cancelled: not CancelledError.
                return defer.Deferred(lambda d: d.errback(EgressProxyError("gave up")))

        endpoint = SrvEndpoint(SRV_NAME, _Answers(records), lambda host, port: Pending(host))
        attempt = endpoint.connect(object())
        self.assertEqual(len(tried), 1)
        attempt.cancel()
        self.failureResultOf(attempt, defer.CancelledError)
        self.assertEqual(len(tried), 1)


class SrvTargetErrorTests(SynchronousTestCase):
    """A target whose endpoint cannot even be built (a bad TLS file) fails that target only."""

    def test_next_target_tried(self):
        from anyproxy.client.gateway_endpoints import SrvEndpoint
        records = {SRV_NAME: [dns.Record_SRV(10, 1, 8443, "bad"), dns.Record_SRV(20, 1, 8443, "good")]}
        connected = object()

        class Good:
            def connect(self, factory):
                return defer.succeed(connected)

        def target_endpoint(host, port):
            if host == "bad":
                raise ConfigError("bad.key: not a private key")
            return Good()

        endpoint = SrvEndpoint(SRV_NAME, _Answers(records), target_endpoint)
        self.assertIs(self.successResultOf(endpoint.connect(object())), connected)


class ConfigFormTests(SynchronousTestCase):
    """C{gateway_addr} entries C{srv:NAME} and C{client.egress_proxy}."""

    def load(self, client):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("client:\n" + "".join("  %s\n" % line for line in client))
        return load_config(path)

    def test_srv_and_plain(self):
        config = self.load(['gateway_addr: ["gw:8443", "srv:%s."]' % (SRV_NAME,)])
        self.assertEqual(config.client.gateway_addrs, (("gw", 8443),))
        self.assertEqual(config.client.gateway_srv, (SRV_NAME,))

    def test_bad_srv(self):
        error = self.assertRaises(ConfigError, self.load, ['gateway_addr: "srv:"'])
        self.assertIn("client.gateway_addr: bad SRV name", str(error))

    def test_egress_proxy(self):
        config = self.load(['gateway_addr: "gw:8443"',
                            'egress_proxy: "http://u:pw-in-url@proxy.corp:3128"'])
        self.assertEqual(str(config.client.egress_proxy), "http://proxy.corp:3128")
        self.assertNotIn("pw-in-url", repr(config))
        error = self.assertRaises(ConfigError, self.load, [
            'gateway_addr: "gw:8443"', 'egress_proxy: "ftp://u:pw-in-url@proxy:21"'])
        self.assertIn("client.egress_proxy: unsupported scheme", str(error))
        self.assertNotIn("pw-in-url", str(error))

    def test_bad_environment(self):
        """A malformed HTTPS_PROXY stops the client at start with a clear error."""
        config = self.load(['gateway_addr: "gw:8443"', "insecure_skip_verify: true"])
        error = self.assertRaises(ConfigError, make_client_service, config, reactor,
                                  environ={"HTTPS_PROXY": "gopher://x"})
        self.assertIn("HTTPS_PROXY/ALL_PROXY in the environment", str(error))


class GatewayAddressTests(TestCase):
    """A client reaching its gateway by a name with several addresses, or by SRV."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        yield self.deployment.start_gateway()
        self.port = self.deployment.gateway_port

    @defer.inlineCallbacks
    def start_client(self, gateway_addr, **kwargs):
        data = self.deployment.client_config(client={
            "gateway_addr": gateway_addr, "gateway_server_name": "localhost"})
        config = load_config(self.deployment.write_config(data))
        service, factories = make_client_service(config, reactor, environ={}, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        yield self.deployment.wait_for_tunnel()
        # The gateway registers the tunnel before the client reads its HELLO.
        while not all(factory.connected for factory in factories.values()):
            yield task.deferLater(reactor, 0.02, lambda: None)
        return service, factories

    @defer.inlineCallbacks
    def test_several_addresses(self):
        """The name resolves to two dead addresses and a good one (IPv6 and IPv4): it connects."""
        resolver = StaticResolver({"gw.corp.test": ["::1", "127.0.0.2", "127.0.0.1"]})
        service, factories = yield self.start_client("gw.corp.test:%d" % (self.port,),
                                                     gateway_resolver=resolver)
        self.assertEqual(resolver.asked, ["gw.corp.test"])
        [factory] = factories.values()
        [tunnel] = factory.connected
        self.assertEqual(tunnel.transport.getPeer().host, "127.0.0.1")

    @defer.inlineCallbacks
    def test_srv(self):
        """The SRV name's lowest priority target is down; the next priority's is dialed."""
        answers = _Answers({SRV_NAME: [
            dns.Record_SRV(10, 0, self.unused_port(), "down.corp.test"),
            dns.Record_SRV(20, 5, self.port, "localhost"),
        ]})
        factory = server.DNSServerFactory(clients=[answers])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        dns_resolver = dns_client.Resolver(servers=[("127.0.0.1", udp.getHost().port)],
                                           reactor=reactor)
        self.addCleanup(self.stop_resolver, dns_resolver)
        names = StaticResolver({"localhost": ["127.0.0.1"], "down.corp.test": ["127.0.0.1"]})
        service, factories = yield self.start_client(
            "srv:" + SRV_NAME, gateway_resolver=names, dns_resolver=dns_resolver)
        self.assertIn((SRV_NAME, dns.SRV), answers.asked)
        self.assertEqual(names.asked, ["down.corp.test", "localhost"])
        self.assertEqual(list(factories), [srv_key(SRV_NAME)])
        self.assertEqual(len(factories[srv_key(SRV_NAME)].connected), 1)

    def unused_port(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def stop_resolver(self, resolver):
        # The client resolver's UDP ports and timers.
        for protocol in list(resolver.connections):
            protocol.transport.loseConnection()
        parse_call = getattr(resolver, "_parseCall", None)
        if parse_call is not None and parse_call.active():
            parse_call.cancel()


