"""
End to end on loopback: the gateway's and the client's /metrics pages
(metrics_addr), scraped with curl before and after known traffic.
"""

import base64

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from anyproxy.config.load import load_config
from tests.support import (
    PROXY_PASSWORD, PROXY_USER, Deployment, Echo, SecretWatch, blob, listen_tcp, run_curl,
    web_site)
from tests.test_e2e_tcp import socks_echo, socks_error
from tests.test_e2e_udp import UdpEcho, exchange, listen_udp, udp_socket

SOCKS = "socks5 proxy"
HTTP = "http proxy"
PAYLOAD = 300 * 1000
PAGE = 20 * 1000


def parse(text):
    """C{{(sample name, frozenset of label items): value}} of an exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@defer.inlineCallbacks
def scrape(testcase, port):
    """GET /metrics on loopback C{port} with curl; the parsed samples."""
    out, err, code = yield run_curl("http://127.0.0.1:%d/metrics" % (port,))
    testcase.assertEqual((code, err), (0, b""))
    return parse(out.decode("utf-8"))


@defer.inlineCallbacks
def wait_until(predicate, timeout=10):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in %ss" % (timeout,))


class MetricsEndToEndTests(unittest.TestCase):
    """Counters on both /metrics pages move by what the traffic did."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.deployment.resolver.table["forbidden.test"] = ["127.0.0.1"]
        yield self.deployment.start_gateway(gateway={"metrics_addr": "127.0.0.1:0"})
        self.client = yield self.deployment.start_client(client={
            "metrics_addr": "127.0.0.1:0", "forbidden_hosts": ["forbidden.test"]})
        self.gateway_metrics = self.deployment.gateway.listeners["metrics"].port.getHost().port
        port = yield self.client.metrics_listener.when_listening()
        self.client_metrics = port.getHost().port
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.web_port = listen_tcp(self, web_site()).getHost().port

    def scrape(self, port):
        return scrape(self, port)

    @defer.inlineCallbacks
    def traffic(self):
        """A SOCKS5 echo, an HTTP GET, an ACL refusal and a refused target."""
        echoed = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                     self.echo_port, blob(PAYLOAD))
        self.assertEqual(len(echoed), PAYLOAD)
        proxy = "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                               self.deployment.http_port)
        out, err, code = yield run_curl("-x", proxy,
                                        "http://127.0.0.1:%d/blob/%d" % (self.web_port, PAGE))
        self.assertEqual((code, len(out)), (0, PAGE), err)
        message = yield deferToThread(socks_error, self.deployment.socks_port, "forbidden.test",
                                      80)
        self.assertIn("0x02", message or "")
        closed = listen_tcp(self, protocol.Factory.forProtocol(Echo))
        closed_port = closed.getHost().port
        yield closed.stopListening()
        message = yield deferToThread(socks_error, self.deployment.socks_port, "127.0.0.1",
                                      closed_port)
        self.assertIn("0x05", message or "")

    @defer.inlineCallbacks
    def test_gateway_counters_move(self):
        """Stream outcomes, latencies and bytes on the gateway move by the traffic's amounts."""
        before = yield self.scrape(self.gateway_metrics)
        yield self.traffic()
        after = yield self.scrape(self.gateway_metrics)

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        opened = "anyproxy_gateway_streams_opened_total"
        self.assertEqual(moved(opened, frontend=SOCKS, outcome="ok"), 1)
        self.assertEqual(moved(opened, frontend=SOCKS, outcome="not_allowed"), 1)
        self.assertEqual(moved(opened, frontend=SOCKS, outcome="connection_refused"), 1)
        self.assertEqual(moved(opened, frontend=HTTP, outcome="ok"), 1)
        self.assertEqual(moved(opened, frontend=HTTP, outcome="not_allowed"), 0)
        self.assertEqual(moved("anyproxy_gateway_stream_open_seconds_count", frontend=SOCKS), 3)
        self.assertGreater(moved("anyproxy_gateway_stream_open_seconds_sum", frontend=SOCKS), 0)

        frontend_bytes = "anyproxy_gateway_frontend_bytes_total"
        self.assertGreaterEqual(moved(frontend_bytes, frontend=SOCKS, direction="in"), PAYLOAD)
        self.assertGreaterEqual(moved(frontend_bytes, frontend=SOCKS, direction="out"), PAYLOAD)
        self.assertGreaterEqual(moved(frontend_bytes, frontend=HTTP, direction="out"), PAGE)
        self.assertGreater(moved(frontend_bytes, frontend=HTTP, direction="in"), 0)
        client_bytes = "anyproxy_gateway_client_bytes_total"
        self.assertGreaterEqual(moved(client_bytes, client_id="client-1", direction="in"),
                                PAYLOAD)
        self.assertGreaterEqual(moved(client_bytes, client_id="client-1", direction="out"),
                                PAYLOAD + PAGE)

        self.assertEqual(value(after, "anyproxy_gateway_tunnels_connected",
                               client_id="client-1", group="default"), 1)
        self.assertGreater(value(after, "process_resident_memory_bytes"), 0)
        self.assertGreater(value(after, "process_open_fds"), 0)

    @defer.inlineCallbacks
    def test_client_counters_move(self):
        """The client reports its tunnel, its ACL refusal and the bytes it carried."""
        before = yield self.scrape(self.client_metrics)
        yield self.traffic()
        after = yield self.scrape(self.client_metrics)

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        gateway = "127.0.0.1:%d" % (self.deployment.gateway_port,)
        self.assertEqual(value(after, "anyproxy_client_tunnels_connected", gateway=gateway), 1)
        self.assertEqual(value(after, "anyproxy_client_tunnels_established_total",
                               gateway=gateway), 1)
        self.assertEqual(value(after, "anyproxy_client_tunnels_lost_total", gateway=gateway), 0)
        self.assertEqual(moved("anyproxy_client_acl_refusals_total", kind="stream"), 1)
        self.assertGreaterEqual(moved("anyproxy_client_bytes_total", gateway=gateway,
                                      direction="in"), PAYLOAD)
        self.assertGreaterEqual(moved("anyproxy_client_bytes_total", gateway=gateway,
                                      direction="out"), PAYLOAD + PAGE)
        self.assertGreater(value(after, "process_resident_memory_bytes"), 0)

    @defer.inlineCallbacks
    def test_tunnel_loss_counted(self):
        """A gateway dropping the tunnel is a lost tunnel, and the reconnect an established one."""
        gateway = "127.0.0.1:%d" % (self.deployment.gateway_port,)
        (factory,) = self.client.factories.values()
        # The gateway registers the tunnel a moment before the client hears its HELLO.
        yield wait_until(lambda: factory.established == 1)
        for tunnel in self.deployment.gateway.tunnel_pool.tunnels():
            tunnel.close()
        yield wait_until(lambda: factory.established == 2)
        after = yield self.scrape(self.client_metrics)
        self.assertEqual(value(after, "anyproxy_client_tunnels_lost_total", gateway=gateway), 1)
        self.assertEqual(value(after, "anyproxy_client_tunnels_established_total",
                               gateway=gateway), 2)

    @defer.inlineCallbacks
    def test_other_paths_not_found(self):
        """Only /metrics is served."""
        out, _, _ = yield run_curl("-o", "/dev/null", "-w", "%{http_code}",
                                   "http://127.0.0.1:%d/" % (self.gateway_metrics,))
        self.assertEqual(out, b"404")


class UdpMetricsEndToEndTests(unittest.TestCase):
    """SOCKS5 UDP datagrams show on both pages: relayed, and refused by access control."""

    timeout = 60

    @defer.inlineCallbacks
    def test_udp_counters_move(self):
        """Three echoed datagrams and one refused one are counted where they happened."""
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"metrics_addr": "127.0.0.1:0"})
        echo_port = listen_udp(self, UdpEcho())
        blocked_port = listen_udp(self, UdpEcho())
        client = yield deployment.start_client(client={
            "metrics_addr": "127.0.0.1:0",
            "forbidden_hosts": ["127.0.0.1:%d" % (blocked_port,)]})
        gateway_port = deployment.gateway.listeners["metrics"].port.getHost().port
        client_port = (yield client.metrics_listener.when_listening()).getHost().port

        def run():
            sock = udp_socket(deployment.socks_port)
            try:
                answers = [exchange(sock, b"ping %d" % i, ("127.0.0.1", echo_port))[0]
                           for i in range(3)]
                sock.sendto(b"blocked", ("127.0.0.1", blocked_port))
                return answers
            finally:
                sock.close()

        answers = yield deferToThread(run)
        self.assertEqual(answers, [b"ping 0", b"ping 1", b"ping 2"])
        yield wait_until(lambda: client.dialer.udp_stats.dropped_acl == 1)
        on_gateway = yield scrape(self, gateway_port)
        on_client = yield scrape(self, client_port)
        relayed = "anyproxy_gateway_udp_datagrams_relayed_total"
        self.assertEqual(value(on_gateway, relayed, direction="to_target"), 4)
        self.assertEqual(value(on_gateway, relayed, direction="to_user"), 3)
        self.assertEqual(value(on_client, "anyproxy_client_udp_datagrams_total",
                               direction="to_target"), 3)
        self.assertEqual(value(on_client, "anyproxy_client_udp_datagrams_dropped_total",
                               reason="acl"), 1)
        self.assertEqual(value(on_client, "anyproxy_client_acl_refusals_total",
                               kind="udp_datagram"), 1)
        self.assertEqual(value(on_client, "anyproxy_client_udp_associations_total"), 1)


METRICS_USER = "prometheus"
METRICS_PASSWORD = "s3cret-scrape-pw"


class MetricsLoginEndToEndTests(unittest.TestCase):
    """metrics_username/metrics_password: curl needs the login on both pages, and a reload
    replaces it at once."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        token = base64.b64encode(("%s:%s" % (METRICS_USER, METRICS_PASSWORD)).encode()).decode()
        SecretWatch(self, secrets=[METRICS_PASSWORD, "new-scrape-pw", token])
        login = {"metrics_addr": "127.0.0.1:0", "metrics_username": METRICS_USER,
                 "metrics_password": METRICS_PASSWORD}
        yield self.deployment.start_gateway(gateway=dict(login))
        self.client = yield self.deployment.start_client(client=dict(login))
        self.gateway_port = self.deployment.gateway.listeners["metrics"].port.getHost().port
        self.client_port = (yield self.client.metrics_listener.when_listening()).getHost().port

    @defer.inlineCallbacks
    def status(self, port, login=None):
        args = ("-o", "/dev/null", "-w", "%{http_code}")
        if login is not None:
            args += ("-u", "%s:%s" % login)
        out, err, code = yield run_curl(*args + ("http://127.0.0.1:%d/metrics" % (port,),))
        self.assertEqual(code, 0, err)
        return int(out)

    @defer.inlineCallbacks
    def test_login_required(self):
        """No login or a wrong one gets 401 from both programs; the right one scrapes."""
        for port in (self.gateway_port, self.client_port):
            statuses = []
            for login in (None, (METRICS_USER, "wrong"), ("other", METRICS_PASSWORD),
                          (METRICS_USER, METRICS_PASSWORD)):
                statuses.append((yield self.status(port, login)))
            self.assertEqual(statuses, [401, 401, 401, 200])
        out, err, code = yield run_curl("-u", "%s:%s" % (METRICS_USER, METRICS_PASSWORD),
                                        "http://127.0.0.1:%d/metrics" % (self.gateway_port,))
        self.assertEqual(code, 0, err)
        self.assertEqual(value(parse(out.decode("utf-8")), "anyproxy_gateway_tunnels_connected",
                               client_id="client-1", group="default"), 1)

    @defer.inlineCallbacks
    def test_reload_replaces_login(self):
        """A reloaded metrics_password applies to the next scrape, on both programs."""
        login = {"metrics_addr": "127.0.0.1:0", "metrics_username": METRICS_USER,
                 "metrics_password": "new-scrape-pw"}
        for program, data, port in (
                (self.deployment.gateway, self.deployment.gateway_config(gateway=dict(login)),
                 self.gateway_port),
                (self.client, self.deployment.client_config(client=dict(login)),
                 self.client_port)):
            config = load_config(self.deployment.write_config(data))
            yield program.reconfigure(config)
            self.assertEqual((yield self.status(port, (METRICS_USER, METRICS_PASSWORD))), 401)
            self.assertEqual((yield self.status(port, (METRICS_USER, "new-scrape-pw"))), 200)
