"""
The HTTP proxy's upstream pool end to end: curl through a real gateway and
client (in this process) to a target that counts its connections.
"""

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import server

from anyproxy.twistd.reload import Reloader
from tests.support import PROXY_PASSWORD, PROXY_USER, BlobResource, Deployment, listen_tcp, run_curl
from tests.test_e2e_reload import write_yaml


class CountingSite(server.Site):
    """The test web site, counting the connections it accepts."""

    connections = 0

    def __init__(self, resource):
        server.Site.__init__(self, resource)
        self.protocols = []

    def buildProtocol(self, addr):
        self.connections += 1
        protocol = server.Site.buildProtocol(self, addr)
        self.protocols.append(protocol)
        return protocol


class UpstreamPoolEndToEndTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.gateway = yield self.deployment.start_gateway()
        self.client = yield self.deployment.start_client()
        self.site = CountingSite(BlobResource())
        self.web_port = listen_tcp(self, self.site).getHost().port

    @defer.inlineCallbacks
    def get(self, host="127.0.0.1", path="/hello"):
        """One curl GET through the HTTP proxy (a new proxy connection): (status, body)."""
        out, err, code = yield run_curl(
            "-x", "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, PROXY_PASSWORD,
                                                 self.deployment.http_port),
            "-w", "\n%{http_code}", "http://%s:%d%s" % (host, self.web_port, path))
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    @defer.inlineCallbacks
    def test_one_target_connection_for_many_users_connections(self):
        """Five curl runs, each its own proxy connection, reach the target over one connection."""
        for _ in range(5):
            status, body = yield self.get()
            self.assertEqual((status, body), (200, b"hello from the target\n"))
        self.assertEqual(self.site.connections, 1)
        self.assertEqual(self.client.dialer.active, 1)  # the pooled stream, idle
        self.assertEqual(self.gateway.limits.per_user.active(PROXY_USER), 0)
        metric = self.gateway.metrics.registry.get_sample_value
        self.assertEqual(metric("anyproxy_gateway_http_upstream_reuses_total",
                                {"frontend": "http proxy"}), 4)
        self.assertEqual(metric("anyproxy_gateway_http_upstream_idle", {"frontend": "http proxy"}), 1)

    @defer.inlineCallbacks
    def test_target_closing_idle_connection(self):
        """A target that closed the idle connection costs nothing: the next request reconnects."""
        self.site.timeOut = 0.3  # the target's keep-alive timeout
        yield self.get()
        yield task.deferLater(reactor, 0.8, lambda: None)
        status, body = yield self.get()
        self.assertEqual((status, self.site.connections), (200, 2))

    @defer.inlineCallbacks
    def test_revoked_by_client_reload(self):
        """A target forbidden by a client reload is refused at once, pooled connection or not."""
        status, _ = yield self.get(host="target.test")
        self.assertEqual(status, 200)
        reloader = Reloader(self.client.config.path, "client", self.client,
                            self.client.config, reactor)
        write_yaml(self.client.config.path, self.deployment.client_config(
            client={"forbidden_hosts": ["target.test"]}))
        self.assertTrue((yield reloader.reload()))
        status, body = yield self.get(host="target.test")
        self.assertEqual(status, 403)
        status, _ = yield self.get(host="127.0.0.1")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_better_route_announced_later(self):
        """
        A connection kept on a client without routes is not reused once
        another client of the group announces a route for the target
        (client.routes): the next request goes to that client.
        """
        status, _ = yield self.get(host="target.test")
        self.assertEqual((status, self.client.dialer.active), (200, 1))
        routed = yield self.deployment.start_client(wait=False, client={
            "client_id": "client-2", "routes": ["target.test"]})
        for _ in range(250):
            if len(self.gateway.tunnel_pool.tunnels()) == 2:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        for _ in range(3):
            status, _ = yield self.get(host="target.test")
            self.assertEqual(status, 200)
        self.assertEqual((self.client.dialer.active, routed.dialer.active), (0, 1))
        self.assertEqual(self.site.connections, 2)
