"""
The gateway's management API (L{anyproxy.gateway.status.management}) end to
end: a real gateway and client in this process on loopback, real SOCKS5
clients (PySocks) and curl through the HTTP proxy, the API called over HTTP
from a thread (C{http.client}), C{anyproxy-ctl} as a subprocess, and
schemathesis against the API's own OpenAPI document.
"""

import base64
import io
import http.client
import json
import os
import socket
import sys
import threading

import yaml
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from anyproxy.config.load import load_config
from anyproxy.ctl_command import main as main_ctl
from anyproxy.gateway.status.config_view import REDACTED, gateway_config_json
from anyproxy.gateway.status.openapi import openapi_document
from tests.support import (
    CLIENT_PASSWORD, PROXY_PASSWORD, PROXY_USER, Deployment, Echo, SecretWatch, listen_tcp)
from tests.test_e2e_tcp import recv_all, socks_connect

STATUS_USER = "operator"
STATUS_PASSWORD = "s3cret-status-pw"
CSRF = {"X-AnyProxy-Request": "1"}


def status_overrides(**gateway):
    overrides = {"status_addr": "127.0.0.1:0", "status_username": STATUS_USER,
                 "status_password": STATUS_PASSWORD}
    overrides.update(gateway)
    return {"gateway": overrides}


def status_secrets():
    token = base64.b64encode(("%s:%s" % (STATUS_USER, STATUS_PASSWORD)).encode()).decode()
    return [STATUS_PASSWORD, token]


def http_call(port, method, path, headers=None, body=None, login=(STATUS_USER, STATUS_PASSWORD)):
    """One HTTP request to the status listener (runs in a thread): C{(status, headers, body)}."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        sent = dict(headers or {})
        if login is not None:
            token = base64.b64encode(("%s:%s" % login).encode()).decode()
            sent["Authorization"] = "Basic " + token
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


class Gated(protocol.Protocol):
    """
    A target that sends C{factory.first} bytes at once, and the rest
    (C{factory.rest}) when the test fires C{factory.release}; then closes.
    """

    def connectionMade(self):
        self.transport.write(b"a" * self.factory.first)
        self.factory.connected.append(self)
        self.factory.release.addCallback(self._rest)

    def _rest(self, _):
        self.transport.write(b"b" * self.factory.rest)
        self.transport.loseConnection()
        return _


def gated_factory(first, rest):
    factory = protocol.Factory.forProtocol(Gated)
    factory.first, factory.rest = first, rest
    factory.release = defer.Deferred()
    factory.connected = []
    return factory


class _APIBase(unittest.TestCase):
    timeout = 60

    gateway_extra = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        SecretWatch(self, secrets=status_secrets())
        yield self.deployment.start_gateway(**status_overrides(**self.gateway_extra))
        yield self.deployment.start_client()
        listener = self.deployment.gateway.listeners["status page"]
        self.status_port = listener.port.getHost().port
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def call(self, method, path, headers=None, body=None, **kwargs):
        return deferToThread(http_call, self.status_port, method, path, headers, body, **kwargs)

    @defer.inlineCallbacks
    def json_call(self, method, path, expect=200, headers=None, body=None, **kwargs):
        status, head, data = yield self.call(method, path, headers, body, **kwargs)
        self.assertEqual(status, expect, data)
        self.assertEqual(head["content-type"], "application/json; charset=utf-8")
        return json.loads(data)

    @defer.inlineCallbacks
    def wait_until(self, predicate, timeout=10.0):
        for _ in range(int(timeout / 0.05)):
            value = yield predicate()
            if value:
                return value
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("condition not met within %gs" % (timeout,))

    @defer.inlineCallbacks
    def streams(self):
        answer = yield self.json_call("GET", "/api/streams")
        return answer["streams"]


class StreamTests(_APIBase):
    """Listing and closing streams."""

    @defer.inlineCallbacks
    def test_list_and_close_socks_stream(self):
        """A SOCKS5 stream is listed with its user, source and target; DELETE closes it."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        try:
            yield deferToThread(sock.sendall, b"x" * 1000)
            yield deferToThread(sock.recv, 1000)
            [stream] = yield self.wait_until(self.streams)
            local = "%s:%d" % sock.getsockname()
            self.assertEqual(
                {key: stream[key] for key in ("user", "source", "frontend", "kind", "target",
                                               "group", "client_id")},
                {"user": PROXY_USER, "source": local, "frontend": "socks5 proxy", "kind": "tcp",
                 "target": "127.0.0.1:%d" % (self.echo_port,), "group": "default",
                 "client_id": "client-1"})
            self.assertGreaterEqual(stream["bytes_up"], 1000)
            self.assertGreaterEqual(stream["age"], 0)
            answer = yield self.json_call("DELETE", "/api/streams/" + stream["id"],
                                          headers=CSRF)
            self.assertEqual(answer, {"id": stream["id"], "closed": True})
            rest = yield deferToThread(recv_all, sock)  # the proxy closes the user's side
            self.assertEqual(rest, b"")
        finally:
            sock.close()
        remaining = yield self.streams()
        self.assertEqual(remaining, [])
        error = yield self.json_call("DELETE", "/api/streams/" + stream["id"], expect=404,
                                     headers=CSRF)
        self.assertIn("no open stream", error["error"])

    @defer.inlineCallbacks
    def test_users_and_tunnels(self):
        """Users show groups and open streams, never a password; tunnels show draining."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        self.addCleanup(sock.close)
        yield self.wait_until(self.streams)
        status, _, data = yield self.call("GET", "/api/users")
        self.assertEqual(status, 200)
        self.assertNotIn(PROXY_PASSWORD.encode(), data)
        [user] = json.loads(data)["users"]
        self.assertEqual((user["username"], user["groups"], user["active_streams"],
                          sorted(user["listeners"])),
                         (PROXY_USER, ["default"], 1, ["http proxy", "socks5 proxy"]))
        self.assertNotIn("password", user)
        answer = yield self.json_call("GET", "/api/tunnels")
        [tunnel] = answer["tunnels"]
        self.assertEqual((tunnel["client_id"], tunnel["draining"], tunnel["active_streams"]),
                         ("client-1", False, 1))


class ClientControlTests(_APIBase):
    """Draining and disconnecting a client."""

    @defer.inlineCallbacks
    def test_drain_client_during_download(self):
        """A client drained mid-download takes no new stream there; the download completes."""
        first, rest = 200 * 1024, 2 * 1024 * 1024
        target = gated_factory(first, rest)
        port = listen_tcp(self, target).getHost().port
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1", port)
        self.addCleanup(sock.close)
        got = yield deferToThread(sock.recv, 65536)
        self.assertTrue(got)
        [old] = self.deployment.gateway.tunnel_pool.tunnels()
        answer = yield self.json_call("POST", "/api/clients/client-1/drain", expect=202,
                                      headers=CSRF)
        self.assertEqual(answer, {"client_id": "client-1", "tunnels": 1, "active_streams": 1})
        self.assertTrue(old.draining)
        self.assertIsNot(self.deployment.gateway.tunnel_pool.pick("default"), old)
        reading = deferToThread(recv_all, sock)
        target.release.callback(None)
        body = yield reading
        sock.close()
        self.assertEqual(len(got) + len(body), first + rest)
        self.assertEqual(body[-1:], b"b")
        # Its streams done, the drained tunnel is closed.
        yield self.wait_until(
            lambda: defer.succeed(old not in self.deployment.gateway.tunnel_pool.tunnels()))

    @defer.inlineCallbacks
    def test_disconnect_client(self):
        """DELETE /api/clients/{id} closes its tunnels; an unknown client is 404."""
        [old] = self.deployment.gateway.tunnel_pool.tunnels()
        answer = yield self.json_call("DELETE", "/api/clients/client-1", headers=CSRF)
        self.assertEqual(answer, {"client_id": "client-1", "tunnels": 1})
        yield self.wait_until(
            lambda: defer.succeed(old not in self.deployment.gateway.tunnel_pool.tunnels()))
        error = yield self.json_call("DELETE", "/api/clients/nobody", expect=404, headers=CSRF)
        self.assertEqual(error, {"error": "no client 'nobody' is connected"})
        yield self.json_call("POST", "/api/clients/nobody/drain", expect=404, headers=CSRF)


class SameIdTwoGroupsTests(_APIBase):
    """Two tenants' clients with one id: C{?group=} picks one of them."""

    gateway_extra = {"auth_groups": ["default", "ops"]}

    @defer.inlineCallbacks
    def test_group_picks_one(self):
        """
        Drain and disconnect with C{?group=} act on that group's tunnels
        only; without it, on both.  A bad C{group} is 400.
        """
        yield self.deployment.start_client(group="ops", client={"client_id": "client-1",
                                                                 "group_id": "ops"})
        pool = self.deployment.gateway.tunnel_pool
        [ours] = [t for t in pool.tunnels() if t.group == "default"]
        [theirs] = [t for t in pool.tunnels() if t.group == "ops"]
        answer = yield self.json_call("POST", "/api/clients/client-1/drain?group=ops",
                                      expect=202, headers=CSRF)
        self.assertEqual(answer["tunnels"], 1)
        self.assertEqual((ours.draining, theirs.draining), (False, True))
        answer = yield self.json_call("DELETE", "/api/clients/client-1?group=default",
                                      headers=CSRF)
        self.assertEqual(answer, {"client_id": "client-1", "tunnels": 1})
        yield self.wait_until(lambda: defer.succeed(ours not in pool.tunnels()))
        error = yield self.json_call("DELETE", "/api/clients/client-1?group=nobody",
                                     expect=404, headers=CSRF)
        self.assertEqual(error, {"error": "no client 'client-1' is connected in group 'nobody'"})
        for query in ("?group=", "?group=ops&group=default", "?group=%ff"):
            yield self.json_call("DELETE", "/api/clients/client-1" + query, expect=400,
                                 headers=CSRF)
        # Both come back after their backoff; without a group, both go.
        yield self.wait_until(lambda: defer.succeed(
            sorted((t.group, t.draining) for t in pool.tunnels())
            == [("default", False), ("ops", False)]),
            timeout=20)
        answer = yield self.json_call("DELETE", "/api/clients/client-1", headers=CSRF)
        self.assertEqual(answer["tunnels"], 2)


class GatewayControlTests(_APIBase):
    """Reload, drain and the config."""

    @defer.inlineCallbacks
    def test_reload(self):
        """POST /api/reload applies a changed file; a bad file is 409 and nothing changes."""
        gateway = self.deployment.gateway
        path = gateway.config.path
        with open(path) as f:
            data = yaml.safe_load(f)
        data["gateway"]["no_tunnel_wait"] = 1.5
        access_log = os.path.join(os.path.dirname(path), "access.jsonl")
        data["gateway"]["access_log"] = access_log
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        table = gateway.user_endpoints.stream_table
        self.assertIsNone(table.access_log)
        answer = yield self.json_call("POST", "/api/reload", headers=CSRF)
        self.assertEqual(answer["applied"], True)
        self.assertIn("gateway.no_tunnel_wait", answer["summary"])
        self.assertIn("gateway.access_log", answer["summary"])
        self.assertEqual(gateway.user_endpoints.no_tunnel_wait, 1.5)
        self.assertEqual(table.access_log.path, access_log)
        data["gateway"]["balance"] = "nonsense"
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        error = yield self.json_call("POST", "/api/reload", expect=409, headers=CSRF)
        self.assertIn("gateway.balance", error["error"])
        self.assertEqual(gateway.config.gateway.balance, "least_streams")

    @defer.inlineCallbacks
    def test_drain_gateway(self):
        """POST /api/drain starts the gateway's drain once; a second call is 409."""
        answer = yield self.json_call("POST", "/api/drain", expect=202,
                                      headers=dict(CSRF, **{"Content-Type": "application/json"}),
                                      body=json.dumps({"timeout": 5}))
        self.assertEqual(answer, {"draining": True, "timeout": 5, "active_streams": 0})
        self.assertIsNotNone(self.deployment.gateway.draining)
        yield self.json_call("POST", "/api/drain", expect=409, headers=CSRF)


class ConfigRedactionTests(unittest.TestCase):
    """GET /api/config shows the effective config with every secret redacted."""

    timeout = 60

    @defer.inlineCallbacks
    def test_every_secret_absent(self):
        """Each password of the file is absent from the answer, its key shows <redacted>."""
        secrets = {
            "users": "s3cret-user-pw", "clients": "s3cret-site-pw",
            "metrics": "s3cret-metrics-pw", "frontend": "s3cret-frontend-pw",
        }
        deployment = Deployment(self)
        SecretWatch(self, secrets=status_secrets() + list(secrets.values()))
        overrides = status_overrides(
            users=[{"username": "bob", "password": secrets["users"], "group": "lab"}],
            clients=[{"username": "site-a", "password": secrets["clients"],
                      "groups": ["default"]}],
            metrics_addr="127.0.0.1:0", metrics_username="prom",
            metrics_password=secrets["metrics"])
        overrides["proxy"] = {"frontends": [{
            "type": "socks5", "listen_addr": "127.0.0.1:0", "auth_username": "carol",
            "auth_password": secrets["frontend"]}]}
        yield deployment.start_gateway(**overrides)
        port = deployment.gateway.listeners["status page"].port.getHost().port
        status, head, data = yield deferToThread(http_call, port, "GET", "/api/config")
        self.assertEqual(status, 200)
        for secret in list(secrets.values()) + [STATUS_PASSWORD, PROXY_PASSWORD,
                                                CLIENT_PASSWORD]:
            self.assertNotIn(secret.encode(), data)
        config = json.loads(data)
        gateway = config["gateway"]
        self.assertEqual([gateway[key] for key in ("auth_password", "status_password",
                                                   "metrics_password")], [REDACTED] * 3)
        self.assertEqual(gateway["users"][0]["password"], REDACTED)
        self.assertEqual(gateway["users"][0]["username"], "bob")
        self.assertEqual(gateway["clients"][0]["password"], REDACTED)
        self.assertEqual(config["proxy"]["socks5"]["auth_password"], REDACTED)
        self.assertEqual(config["proxy"]["frontends"][0]["auth_password"], REDACTED)
        self.assertEqual(gateway["status_username"], STATUS_USER)

    def test_fleet_redis_url(self):
        """The Redis URL keeps its host and database, never its user or password."""
        deployment = Deployment(self)
        data = deployment.gateway_config()
        data["gateway"]["fleet"] = {
            "redis": "redis://fleet-user:s3cret-redis-pw@10.0.0.9:6380/2",
            "peer_addr": "127.0.0.1:8444", "peer_ca": deployment.pki.ca_path,
            "peer_cert": deployment.pki.cert_path, "peer_key": deployment.pki.key_path}
        config = load_config(deployment.write_config(data))
        shown = json.dumps(gateway_config_json(config))
        for secret in ("s3cret-redis-pw", "fleet-user", CLIENT_PASSWORD, PROXY_PASSWORD):
            self.assertNotIn(secret, shown)
        self.assertEqual(json.loads(shown)["gateway"]["fleet"]["redis"], "redis://10.0.0.9:6380/2")


# Every path and method of the API, with a path that exists for it.
EVERY_CALL = [
    ("GET", "/api/status"), ("GET", "/api/tunnels"), ("GET", "/api/streams"),
    ("DELETE", "/api/streams/x"), ("GET", "/api/users"), ("DELETE", "/api/clients/x"),
    ("POST", "/api/clients/x/drain"), ("POST", "/api/drain"), ("POST", "/api/reload"),
    ("GET", "/api/config"), ("GET", "/api/openapi.json"), ("GET", "/api/nothing"),
]


class ProtectionTests(_APIBase):
    """Logins, CSRF checks and the JSON errors."""

    # Dozens of wrong logins from loopback: the login throttle (its own
    # tests: tests.test_e2e_credentials) would answer 429 after the fifth.
    gateway_extra = {"auth_throttle": {"failures": 0}}

    @defer.inlineCallbacks
    def test_unauthenticated_calls_get_401(self):
        """Every call without a login, or with a wrong one, is 401 JSON with a Basic challenge."""
        for login in (None, (STATUS_USER, "wrong"), ("someone", STATUS_PASSWORD)):
            for method, path in EVERY_CALL:
                status, head, data = yield self.call(method, path, CSRF, login=login)
                self.assertEqual(status, 401, (method, path))
                self.assertEqual(json.loads(data), {"error": "authentication required"})
                self.assertIn('basic realm="anyproxy status"',
                              head["www-authenticate"].lower())
        self.assertIsNone(self.deployment.gateway.draining)

    @defer.inlineCallbacks
    def test_csrf(self):
        """POST and DELETE need X-AnyProxy-Request and this origin; no CORS preflight passes."""
        refusals = [
            {},
            {"X-AnyProxy-Request": "1", "Origin": "http://evil.example"},
            {"X-AnyProxy-Request": "1", "Origin": "http://127.0.0.1:1"},
            {"X-AnyProxy-Request": "1", "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in refusals:
            for method, path in (("POST", "/api/drain"), ("DELETE", "/api/clients/client-1"),
                                 ("POST", "/api/reload")):
                error = yield self.json_call(method, path, expect=403, headers=headers)
                self.assertIn("error", error)
        self.assertIsNone(self.deployment.gateway.draining)
        self.assertEqual(len(self.deployment.gateway.tunnel_pool.tunnels()), 1)
        status, head, _ = yield self.call("OPTIONS", "/api/drain", {
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-anyproxy-request"})
        self.assertEqual(status, 405)
        self.assertFalse([name for name in head if name.startswith("access-control-")])
        same = "http://127.0.0.1:%d" % (self.status_port,)
        answer = yield self.json_call("POST", "/api/clients/client-1/drain", expect=202,
                                      headers={"X-AnyProxy-Request": "1", "Origin": same,
                                               "Sec-Fetch-Site": "same-origin"})
        self.assertEqual(answer["tunnels"], 1)

    @defer.inlineCallbacks
    def test_errors(self):
        """404, 405 with Allow, 400, 413 and 415 are JSON errors."""
        error = yield self.json_call("GET", "/api/nothing", expect=404)
        self.assertEqual(error, {"error": "no such path"})
        status, head, data = yield self.call("POST", "/api/streams", CSRF)
        self.assertEqual((status, head["allow"]), (405, "GET, HEAD"))
        self.assertIn("error", json.loads(data))
        status, head, _ = yield self.call("GET", "/api/reload")
        self.assertEqual((status, head["allow"]), (405, "POST"))
        json_type = dict(CSRF, **{"Content-Type": "application/json"})
        cases = [
            (400, json_type, b"{not json"),
            (400, json_type, b"[1]"),
            (400, json_type, b'{"timeout": "soon"}'),
            (400, json_type, b'{"when": 1}'),
            (413, json_type, b'{"timeout": 1, "pad": "%s"}' % (b"x" * 5000,)),
            (415, dict(CSRF, **{"Content-Type": "text/plain"}), b"timeout=1"),
            # A key given twice is refused, not "the last one wins".
            (400, json_type, b'{"timeout": "soon", "timeout": 7}'),
        ]
        for expect, headers, body in cases:
            error = yield self.json_call("POST", "/api/drain", expect=expect, headers=headers,
                                         body=body)
            self.assertIn("error", error)
        self.assertIn("twice", error["error"])
        self.assertIsNone(self.deployment.gateway.draining)

    @defer.inlineCallbacks
    def test_get_body_not_read(self):
        """A GET's body, of any type or size under the listener's cap, is not read: 200."""
        for headers, body in (({"Content-Type": "text/plain"}, b"x"),
                              ({"Content-Type": "application/json"}, b"{not json"),
                              ({"Content-Type": "application/json"}, b" " * 5000)):
            for path in ("/api/status", "/api/users"):
                status, _, data = yield self.call("GET", path, headers, body)
                self.assertEqual(status, 200, (path, data))

    @defer.inlineCallbacks
    def test_openapi_document(self):
        """GET /api/openapi.json is an OpenAPI 3.1 document naming every route of the API."""
        document = yield self.json_call("GET", "/api/openapi.json")
        self.assertEqual(document, openapi_document())
        self.assertEqual(document["openapi"], "3.1.0")
        documented = {(method.upper(), path) for path, item in document["paths"].items()
                      for method in item}
        from anyproxy.gateway.status.management import ROUTES
        routed = {(method, "/api/" + pattern.replace("([^/]+)", "{}").replace("\\.", "."))
                  for method, pattern, _ in ROUTES}
        normalized = {(method, path.replace("{stream_id}", "{}").replace("{client_id}", "{}"))
                      for method, path in documented}
        self.assertEqual(normalized, routed)
        # The login throttle's 429 can answer any call.
        for path, item in document["paths"].items():
            for method, operation in item.items():
                self.assertIn("Retry-After", operation["responses"]["429"]["headers"],
                              (method, path))


def run_ctl(port, *args, password=STATUS_PASSWORD, url=None):
    """Run C{anyproxy-ctl} as a subprocess: a Deferred of C{(stdout, stderr, exit code)}."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    if password is not None:
        env["ANYPROXY_CTL_PASSWORD"] = password
    base = ["-m", "anyproxy.ctl_command", "--url", url or "http://127.0.0.1:%d" % (port,),
            "--user", STATUS_USER, "--timeout", "10"]
    return getProcessOutputAndValue(sys.executable, base + list(args), env=env)


class CtlTests(_APIBase):
    """C{anyproxy-ctl} as a subprocess: tables, --json and exit codes."""

    timeout = 90

    @defer.inlineCallbacks
    def test_streams_and_kick(self):
        """C{streams} prints a table (or JSON); C{kick ID} closes it; an unknown ID exits 3."""
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        self.addCleanup(sock.close)
        [stream] = yield self.wait_until(self.streams)
        out, err, code = yield run_ctl(self.status_port, "streams")
        self.assertEqual(code, 0, err)
        header, row = out.decode().splitlines()
        self.assertEqual(header.split(), ["ID", "USER", "SOURCE", "FRONTEND", "TARGET", "GROUP",
                                          "CLIENT", "UP", "DOWN", "AGE"])
        self.assertTrue(row.startswith(stream["id"] + " "), row)
        self.assertIn("client-1", row)
        out, err, code = yield run_ctl(self.status_port, "--json", "streams")
        self.assertEqual(code, 0, err)
        self.assertEqual([each["id"] for each in json.loads(out)["streams"]], [stream["id"]])
        out, err, code = yield run_ctl(self.status_port, "kick", stream["id"])
        self.assertEqual((code, out.decode()), (0, "closed stream %s\n" % (stream["id"],)), err)
        rest = yield deferToThread(recv_all, sock)
        self.assertEqual(rest, b"")
        out, err, code = yield run_ctl(self.status_port, "kick", stream["id"])
        self.assertEqual(code, 3)
        self.assertIn(b"404", err)

    @defer.inlineCallbacks
    def test_tables_and_actions(self):
        """tunnels, users, config, reload, drain and disconnect through the CLI."""
        out, err, code = yield run_ctl(self.status_port, "tunnels")
        self.assertEqual(code, 0, err)
        self.assertIn("client-1", out.decode().splitlines()[1])
        out, err, code = yield run_ctl(self.status_port, "users")
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().splitlines()[1].split()[:3], [PROXY_USER, "default", "0"])
        out, err, code = yield run_ctl(self.status_port, "config")
        self.assertEqual(code, 0, err)
        self.assertNotIn(STATUS_PASSWORD.encode(), out)
        self.assertEqual(json.loads(out)["gateway"]["status_password"], REDACTED)
        out, err, code = yield run_ctl(self.status_port, "reload")
        self.assertEqual((code, out.decode().splitlines()[0]), (0, "reloaded: no key changed; "
                                                                   "certificates re-read"), err)
        out, err, code = yield run_ctl(self.status_port, "drain", "client-1")
        self.assertEqual((code, out.decode()),
                         (0, "draining client-1 (1 tunnels, 0 streams open)\n"), err)
        yield self.deployment.wait_for_tunnel()  # the client comes back
        out, err, code = yield run_ctl(self.status_port, "--json", "disconnect", "client-1")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["client_id"], "client-1")
        out, err, code = yield run_ctl(self.status_port, "disconnect", "nobody")
        self.assertEqual(code, 3)
        yield self.deployment.wait_for_tunnel()
        out, err, code = yield run_ctl(self.status_port, "disconnect", "--group", "ops",
                                       "client-1")
        self.assertEqual(code, 3)
        self.assertIn(b"in group 'ops'", err)
        out, err, code = yield run_ctl(self.status_port, "disconnect", "--group=", "client-1")
        self.assertEqual(code, 2)
        self.assertIn(b"not empty", err)
        out, err, code = yield run_ctl(self.status_port, "drain", "client-1",
                                       "--group=default")
        self.assertEqual((code, out.decode()),
                         (0, "draining client-1 (1 tunnels, 0 streams open)\n"), err)
        out, err, code = yield run_ctl(self.status_port, "drain-gateway")
        self.assertEqual((code, out.decode()), (0, "gateway draining (0 streams open)\n"), err)
        out, err, code = yield run_ctl(self.status_port, "drain-gateway")
        self.assertEqual(code, 1)
        self.assertIn(b"409", err)

    @defer.inlineCallbacks
    def test_exit_codes(self):
        """A wrong password exits 1, no server or bad usage 2, never a traceback."""
        out, err, code = yield run_ctl(self.status_port, "streams", password="wrong")
        self.assertEqual(code, 1)
        self.assertIn(b"401", err)
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        unused = free.getsockname()[1]
        free.close()
        out, err, code = yield run_ctl(unused, "streams")
        self.assertEqual(code, 2)
        self.assertIn(b"no answer", err)
        out, err, code = yield run_ctl(self.status_port, "frobnicate")
        self.assertEqual(code, 2)
        out, err, code = yield run_ctl(self.status_port, "streams", password=None)
        self.assertEqual(code, 2)
        self.assertIn(b"--password-file", err)
        for output in (out, err):
            self.assertNotIn(b"Traceback", output)

    @defer.inlineCallbacks
    def test_not_the_api(self):
        """A --url that answers 200 with something else than JSON: exit 2 and one line."""
        from twisted.web import resource, server

        class Page(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                return b"<html>some other site</html>"

        port = reactor.listenTCP(0, server.Site(Page()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        out, err, code = yield run_ctl(port.getHost().port, "streams")
        self.assertEqual(code, 2)
        self.assertIn(b"not the management API's JSON", err)
        self.assertNotIn(b"Traceback", err)


def _serve_raw(test, reply, seen=None):
    """
    A loopback listener answering every connection with the bytes C{reply}
    (in a thread); each request's head goes into C{seen}.  Its http:// URL.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    test.addCleanup(listener.close)

    def loop():
        try:
            while True:
                connection, _ = listener.accept()
                head = connection.recv(65536)
                if seen is not None:
                    seen.append(head)
                connection.sendall(reply)
                connection.close()
        except OSError:
            pass  # the listener closed
    threading.Thread(target=loop, daemon=True).start()
    return "http://127.0.0.1:%d" % (listener.getsockname()[1],)


class CtlAnswerTests(unittest.TestCase):
    """C{anyproxy-ctl} against answers that are not the API's: exit 2, one line, the login kept."""

    def ctl(self, *argv, password=b"secret-pw\n"):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(password)
        out, err = io.StringIO(), io.StringIO()
        code = main_ctl(["--password-file", path, "--timeout", "5"] + list(argv),
                        stdout=out, stderr=err)
        self.assertNotIn("Traceback", err.getvalue())
        return code, err.getvalue()

    def test_bad_urls_and_files(self):
        """No scheme, a missing --cacert, a password file that is not UTF-8."""
        code, err = self.ctl("--url", "gateway", "streams")
        self.assertEqual(code, 2)
        self.assertIn("http://", err)
        code, err = self.ctl("--url", "https://127.0.0.1:1", "--cacert", "/nonexistent",
                             "streams")
        self.assertEqual(code, 2)
        self.assertIn("--cacert", err)
        code, err = self.ctl("--url", "http://127.0.0.1:1", "streams", password=b"\xff\xfe\n")
        self.assertEqual(code, 2)
        self.assertIn("UTF-8", err)

    def test_not_http_or_wrong_shape(self):
        """Something else than HTTP, a cut answer, JSON of another shape: exit 2."""
        for reply in (b"SSH-2.0-OpenSSH_9.0\r\n",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"str",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnull"):
            code, err = self.ctl("--url", _serve_raw(self, reply), "streams")
            self.assertEqual(code, 2, (reply, err))

    def test_login_not_sent_on(self):
        """A redirect is not followed (the login would go with it); CRLF ends the password."""
        target, first = [], []
        elsewhere = _serve_raw(self, b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n"
                                     b'{"streams": []}', target)
        url = _serve_raw(self, b"HTTP/1.1 302 Found\r\nLocation: %s/api/streams\r\n"
                               b"Content-Length: 0\r\n\r\n" % (elsewhere.encode(),), first)
        code, err = self.ctl("--url", url, "streams", password=b"secret-pw\r\n")
        self.assertEqual(code, 2)
        self.assertIn("redirect", err)
        self.assertEqual(target, [])
        self.assertIn(b"Basic " + base64.b64encode(b"admin:secret-pw") + b"\r\n", first[0])

    @defer.inlineCallbacks
    def test_no_proxy_from_the_environment(self):
        """http_proxy does not carry the login: the call goes to --url itself."""
        proxied = []
        proxy = _serve_raw(self, b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
                           proxied)
        direct = []
        url = _serve_raw(self, b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n"
                               b'{"streams": []}', direct)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "PYTHONPATH": os.pathsep.join(sys.path), "ANYPROXY_CTL_PASSWORD": "pw",
               "http_proxy": proxy, "HTTP_PROXY": proxy}
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "anyproxy.ctl_command", "--url", url, "streams"], env=env)
        self.assertEqual((code, proxied), (0, []), err)
        self.assertEqual(len(direct), 1)


class SchemathesisTests(_APIBase):
    """schemathesis, from the API's own OpenAPI document, finds no 5xx and no schema break."""

    timeout = 120

    @defer.inlineCallbacks
    def test_schemathesis(self):
        """A fixed, derandomized run of every operation against the loopback gateway."""
        # A held stream, so /api/streams and /api/users answer with rows.
        sock = yield deferToThread(socks_connect, self.deployment.socks_port, "127.0.0.1",
                                   self.echo_port)
        self.addCleanup(sock.close)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        st = os.path.join(os.path.dirname(sys.executable), "st")
        if not os.path.exists(st):
            raise unittest.SkipTest("no %s (pip install -e .[test])" % (st,))
        url = "http://127.0.0.1:%d/api/openapi.json" % (self.status_port,)
        checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
                  "response_schema_conformance,response_headers_conformance,ignored_auth")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory,
               "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
        out, err, code = yield getProcessOutputAndValue(st, [
            "run", url, "--auth", "%s:%s" % (STATUS_USER, STATUS_PASSWORD),
            "--checks", checks, "--mode", "all", "--phases", "examples,coverage,fuzzing",
            "--max-examples", "40", "--seed", "1", "--generation-deterministic",
            "--workers", "1", "--no-color",
            "--request-timeout", "10", "--suppress-health-check", "all",
            "--report", "junit", "--report-dir", directory,
        ], env=env, path=directory)
        text = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
        self.assertEqual(code, 0, text[-4000:])
        # Every operation of the document is tested but the document's own
        # (schemathesis does not count the path it loaded the spec from).
        from anyproxy.gateway.status.openapi import openapi_document
        operations = sum(len(methods) for methods in openapi_document()["paths"].values())
        self.assertIn("Operations:       %d selected / %d total" % (operations - 1,
                                                                   operations - 1), text)
        self.assertIn("Tested: %d" % (operations - 1,), text)


class PolicyViewTests(unittest.SynchronousTestCase):
    """How /api/users shows a user's policy, and bodies it cannot parse."""

    def test_rules_as_written(self):
        """allow and deny rules (as in etc/gateway.yaml) show as their text, JSON-encodable."""
        from anyproxy.gateway.status.management import _policy
        etc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
        config = load_config(os.path.join(etc, "gateway.yaml"), check_files=False)
        [entry] = [user for user in config.gateway.users if user.allow or user.deny]
        policy = _policy(entry)
        json.dumps(policy)
        self.assertEqual((policy["allow"], policy["deny"]),
                         (["*.corp.example", "10.1.0.0/16:22 (tcp)"], ["payroll.corp.example"]))

    def test_nested_too_deep(self):
        """JSON nested deeper than the parser goes is a 400, not a 500."""
        from twisted.web.test.requesthelper import DummyRequest
        from anyproxy.gateway.status.management import APIError, ManagementAPI
        request = DummyRequest([b"api", b"drain"])
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.content = io.BytesIO(b"[" * 2000 + b"]" * 2000)  # under MAX_BODY
        api = ManagementAPI(None, None, None)
        error = self.assertRaises(APIError, api._read_body, request)
        self.assertEqual(error.status, 400)
