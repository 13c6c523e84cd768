"""
Tests for the files under C{deploy/}: the HAProxy config (checked by
C{haproxy -c}, then run in front of a real gateway and client on loopback),
the systemd units (C{systemd-analyze verify} and its offline security
score), the Kubernetes example (YAML documents of the expected kinds, a
gateway config that loads) and the Grafana dashboard (every metric it
queries is one the gateway or the client exports).
"""

import json
import os
import re
import shutil
import sys

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from anyproxy.config.load import load_config
from tests.support import Deployment, Echo, listen_tcp, run_curl, web_site
from tests.test_e2e_tcp import socks_connect
from tests.ports import free_port
from tests.test_e2e_twistd import ProcessWatcher, port_open, wait_until
from tests.test_drain import round_trip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
HAPROXY_CONFIG = os.path.join(DEPLOY, "haproxy", "anyproxy.cfg")
UNITS = ("anyproxy-gateway.service", "anyproxy-client.service")
# The venv path the units name, replaced by this checkout's for verify
# (which wants ExecStart to be an executable).
UNIT_VENV = "/opt/anyproxy/venv"
# systemd-analyze security's exposure: 0 (locked down) .. 10 (none at all).
MAX_EXPOSURE = 2.5


def need(program):
    # /usr/sbin (haproxy) is not on every user's PATH.
    path = shutil.which(program, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
    if path is None:
        raise unittest.SkipTest("%s is not installed (Debian package %s; .ci/run installs it)"
                                % (program, {"systemd-analyze": "systemd"}.get(program, program)))
    return path


def haproxy_env(gateways, bind_ports, stats_port):
    """
    The environment deploy/haproxy/anyproxy.cfg reads: every address given,
    on loopback, so nothing is looked up by name.

    @param gateways: three C{{"tunnel": port, "socks": port, "http": port,
        "ready": port}}; C{"ready"} is the metrics listener's, where the
        health checks ask C{GET /ready}.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ANYPROXY_BIND": "127.0.0.1",
           "ANYPROXY_STATS_ADDR": "127.0.0.1:%d" % stats_port}
    for kind, port in bind_ports.items():
        env["ANYPROXY_%s_PORT" % kind.upper()] = str(port)
    for number, ports in enumerate(gateways, 1):
        for kind, port in ports.items():
            if kind == "ready":
                env["ANYPROXY_GW%d_READY_PORT" % number] = str(port)
            else:
                env["ANYPROXY_GW%d_%s" % (number, kind.upper())] = "127.0.0.1:%d" % port
    return env


# HAProxy's stats CSV columns (management guide, "CSV format").
CSV_REDISPATCHES = 16
CSV_STATUS = 17
CSV_CHECK_STATUS = 36
CSV_CHECK_CODE = 37
BACKENDS = ("anyproxy_tunnels", "anyproxy_socks5", "anyproxy_http")
GATEWAY_PORTS = ("tunnel", "socks", "http", "ready")


class HaproxyConfigTests(unittest.TestCase):
    """deploy/haproxy/anyproxy.cfg is valid and balances over gateways that refuse."""

    timeout = 60

    def setUp(self):
        self.haproxy = need("haproxy")
        self.bind_ports = {kind: free_port() for kind in ("tunnel", "socks", "http")}
        self.stats_port = free_port()

    def env(self, gateways):
        return haproxy_env(gateways, self.bind_ports, self.stats_port)

    @defer.inlineCallbacks
    def start_gateway(self, deployment, **gateway):
        """A gateway with its metrics listener on loopback; returns its ports."""
        gateway.setdefault("metrics_addr", "127.0.0.1:0")
        service = yield deployment.start_gateway(gateway=gateway)
        return service, {"tunnel": deployment.gateway_port, "socks": deployment.socks_port,
                         "http": deployment.http_port,
                         "ready": service.listeners["metrics"].port.getHost().port}

    @defer.inlineCallbacks
    def stats(self):
        """HAProxy's status CSV: C{{(backend, server): columns}}."""
        response = yield Agent(reactor).request(
            b"GET", b"http://127.0.0.1:%d/;csv" % self.stats_port)
        text = (yield readBody(response)).decode("utf-8")
        return {tuple(row.split(",")[:2]): row.split(",")
                for row in text.splitlines() if row and not row.startswith("#")}

    @defer.inlineCallbacks
    def test_config_checks(self):
        """haproxy -c accepts the config, rendered with free ports, without a warning."""
        gateways = [{kind: free_port() for kind in GATEWAY_PORTS} for _ in range(3)]
        out, err, code = yield getProcessOutputAndValue(
            self.haproxy, ("-c", "-f", HAPROXY_CONFIG), env=self.env(gateways))
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, text)
        self.assertIn("Configuration file is valid", text)
        self.assertNotIn("WARNING", text)
        self.assertNotIn("ALERT", text)

    @defer.inlineCallbacks
    def test_refused_gateways_are_skipped(self):
        """
        In front of one live gateway and two refusing ports, every SOCKS5
        and HTTP request and the client's tunnel get through (retries with
        redispatch), before the health checks mark the dead ones down.
        """
        deployment = Deployment(self)
        gateway, live = yield self.start_gateway(deployment)
        dead = [{kind: free_port() for kind in GATEWAY_PORTS} for _ in range(2)]
        # gw1 and gw2 refuse: with leastconn and no connection yet, the
        # first server in the list is tried first.
        yield self.start_haproxy(dead + [live])
        yield deployment.start_client(
            wait=False, client={"gateway_addr": "127.0.0.1:%d" % self.bind_ports["tunnel"]})
        yield gateway.tunnel_pool.wait_for("default", 10)

        echo = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        web = listen_tcp(self, web_site()).getHost().port
        for attempt in range(4):
            sock = yield deferToThread(socks_connect, self.bind_ports["socks"], "127.0.0.1", echo)
            try:
                payload = b"through haproxy %d" % attempt
                self.assertEqual((yield deferToThread(round_trip, sock, payload)), payload)
            finally:
                sock.close()
            out, err, code = yield run_curl(
                "-x", "http://alice:s3cret-proxy-pw@127.0.0.1:%d" % self.bind_ports["http"],
                "http://127.0.0.1:%d/hello" % web)
            self.assertEqual((out, code), (b"hello from the target\n", 0), err)

        # HAProxy's page shows the live gateway up and the others going down.
        rows = yield self.stats()
        for backend in BACKENDS:
            self.assertTrue(rows[(backend, "gw3")][CSV_STATUS].startswith("UP"), rows)
            # Refused connects were sent on to another server, not failed,
            # unless the checks (every 0.5 s once one failed) were quicker.
            redispatched = int(rows[(backend, "BACKEND")][CSV_REDISPATCHES])
            down = all(rows[(backend, dead)][CSV_STATUS] == "DOWN" for dead in ("gw1", "gw2"))
            self.assertTrue(redispatched > 0 or down, rows)

    @defer.inlineCallbacks
    def test_draining_gateway_taken_out_while_accepting(self):
        """
        Once a drain begins, every backend's GET /ready check sees 503 and
        takes the gateway out within inter + fastinter (2.5 s) and a margin,
        while its proxy and tunnel listeners still accept (drain_delay).
        """
        deployment = Deployment(self)
        gateway, live = yield self.start_gateway(deployment, drain_timeout=30, drain_delay=20)
        dead = [{kind: free_port() for kind in GATEWAY_PORTS} for _ in range(2)]
        yield self.start_haproxy([live] + dead)

        @defer.inlineCallbacks
        def statuses(check_code=None):
            rows = yield self.stats()
            return {backend: rows[(backend, "gw1")][CSV_STATUS] for backend in BACKENDS
                    if check_code is None or rows[(backend, "gw1")][CSV_CHECK_CODE] == check_code}

        # Up, and its /ready answered 200 to every backend's check.
        yield wait_until(lambda: statuses("200").addCallback(
            lambda found: found == dict.fromkeys(BACKENDS, "UP")), 10)
        gateway.drain(30, clock=Clock())  # the delay never ends: its listeners stay open
        self.addCleanup(gateway.cut_drain)
        started = reactor.seconds()
        yield wait_until(lambda: statuses("503").addCallback(
            lambda found: found == dict.fromkeys(BACKENDS, "DOWN")), 10)
        taken_out = reactor.seconds() - started
        self.assertLess(taken_out, 4.5)
        self.assertIsNone(gateway.draining.listeners_closed)
        for port in (live["tunnel"], live["socks"], live["http"]):
            self.assertTrue(port_open(port), port)

    def start_haproxy(self, gateways):
        watcher = ProcessWatcher()
        transport = reactor.spawnProcess(
            watcher, self.haproxy, (self.haproxy, "-db", "-f", HAPROXY_CONFIG),
            env=self.env(gateways))

        def stop():
            if not watcher.ended.called:
                transport.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(stop)
        return wait_until(lambda: all(port_open(port) for port in self.bind_ports.values()), 10)


class SystemdUnitTests(unittest.TestCase):
    """The systemd units pass systemd-analyze verify and are well hardened."""

    def setUp(self):
        self.analyze = need("systemd-analyze")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def render(self, name):
        """The unit with this checkout's venv in place of /opt/anyproxy/venv."""
        with open(os.path.join(DEPLOY, "systemd", name)) as f:
            text = f.read()
        venv = os.path.dirname(os.path.dirname(sys.executable))
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text.replace(UNIT_VENV, venv))
        return path

    @defer.inlineCallbacks
    def test_verify(self):
        """systemd-analyze verify finds nothing to say about either unit."""
        for name in UNITS:
            out, err, code = yield getProcessOutputAndValue(
                self.analyze, ("verify", self.render(name)), env=dict(os.environ))
            self.assertEqual((code, out + err), (0, b""), name)

    @defer.inlineCallbacks
    def test_security_exposure(self):
        """systemd-analyze security rates each unit's exposure low."""
        for name in UNITS:
            out, err, code = yield getProcessOutputAndValue(
                self.analyze, ("security", "--offline=yes", "--no-pager", self.render(name)),
                env=dict(os.environ))
            text = (out + err).decode("utf-8", "replace")
            found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", text)
            self.assertIsNotNone(found, text)
            self.assertLessEqual(float(found.group(1)), MAX_EXPOSURE, text)

    def test_drain_fits_stop_timeout(self):
        """The gateway unit waits longer than the default drain_timeout before SIGKILL."""
        with open(os.path.join(DEPLOY, "systemd", "anyproxy-gateway.service")) as f:
            text = f.read()
        settings = dict(line.split("=", 1) for line in text.splitlines()
                        if "=" in line and not line.startswith("#"))
        self.assertGreater(int(settings["TimeoutStopSec"]), 30)
        self.assertEqual(settings["KillSignal"], "SIGTERM")
        self.assertEqual(settings["Restart"], "on-failure")
        self.assertIn(" -n ", settings["ExecStart"])


class KubernetesTests(unittest.TestCase):
    """deploy/kubernetes/anyproxy.yaml: the expected objects, and a config that loads."""

    def setUp(self):
        with open(os.path.join(DEPLOY, "kubernetes", "anyproxy.yaml")) as f:
            self.documents = [each for each in yaml.safe_load_all(f) if each is not None]

    def by_name(self, kind, name):
        for each in self.documents:
            if each["kind"] == kind and each["metadata"]["name"] == name:
                return each
        self.fail("no %s %s" % (kind, name))

    def test_kinds(self):
        """A ConfigMap, the gateway and Redis Deployments, and their Services."""
        self.assertEqual(sorted((each["kind"], each["metadata"]["name"])
                                for each in self.documents),
                         [("ConfigMap", "anyproxy-gateway"), ("Deployment", "anyproxy-gateway"),
                          ("Deployment", "anyproxy-redis"), ("Service", "anyproxy"),
                          ("Service", "anyproxy-redis")])

    def test_selectors_match(self):
        """Each Service selects the pods of a Deployment, and names ports they declare."""
        for service_name, deployment_name in (("anyproxy", "anyproxy-gateway"),
                                              ("anyproxy-redis", "anyproxy-redis")):
            service = self.by_name("Service", service_name)
            deployment = self.by_name("Deployment", deployment_name)
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            self.assertEqual(deployment["spec"]["selector"]["matchLabels"], labels)
            self.assertLessEqual(service["spec"]["selector"].items(), labels.items())
            declared = {port["name"] for container in deployment["spec"]["template"]["spec"]
                        ["containers"] for port in container["ports"]}
            for port in service["spec"]["ports"]:
                self.assertIn(port["targetPort"], declared)

    def gateway_yaml(self):
        return yaml.safe_load(self.by_name("ConfigMap", "anyproxy-gateway")["data"]
                              ["gateway.yaml"])

    def test_grace_above_drain(self):
        """Pods get longer than drain_timeout (which includes drain_delay) to stop."""
        config = self.gateway_yaml()
        pod = self.by_name("Deployment", "anyproxy-gateway")["spec"]["template"]["spec"]
        self.assertGreater(pod["terminationGracePeriodSeconds"],
                           config["gateway"]["drain_timeout"] + 5)

    def test_readiness_probe(self):
        """
        The readinessProbe asks GET /ready on the metrics port the config
        listens on, and drain_delay outlasts the probe's detection time.
        """
        config = self.gateway_yaml()["gateway"]
        [container] = self.by_name("Deployment", "anyproxy-gateway")["spec"]["template"][
            "spec"]["containers"]
        probe = container["readinessProbe"]
        self.assertEqual(probe["httpGet"]["path"], "/ready")
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        self.assertEqual(":%d" % ports[probe["httpGet"]["port"]],
                         config["metrics_addr"][config["metrics_addr"].rindex(":"):])
        self.assertGreater(config["drain_delay"],
                           probe["periodSeconds"] * probe["failureThreshold"])
        self.assertLess(config["drain_delay"], config["drain_timeout"])

    def test_gateway_config_loads(self):
        """The ConfigMap's gateway.yaml loads, with test certificates in place of the Secret's."""
        deployment = Deployment(self)
        pki = deployment.pki
        text = self.by_name("ConfigMap", "anyproxy-gateway")["data"]["gateway.yaml"]
        for name, path in (("server.crt", pki.cert_path), ("server.key", pki.key_path),
                           ("fleet-ca.crt", pki.ca_path), ("node.crt", pki.cert_path),
                           ("node.key", pki.key_path)):
            text = text.replace("/etc/anyproxy/certs/" + name, path)
        text = text.replace("@POD_IP@", "10.0.0.5")  # what the container does at start
        path = os.path.join(deployment.directory, "gateway.yaml")
        with open(path, "w") as f:
            f.write(text)
        config = load_config(path, role="gateway")
        self.assertEqual(config.gateway.drain_timeout, 30)
        self.assertEqual(config.gateway.fleet.redis, "redis://anyproxy-redis:6379/0")
        self.assertEqual(config.gateway.fleet.advertise_addr, "10.0.0.5:8443")


# Metric names in a PromQL expression: ours and the process collector's.
_METRIC = re.compile(r"\b((?:anyproxy|process)_[a-z0-9_]+)\b")


def _family(sample_name):
    """The metric family a sample name belongs to (C{x_total}, C{x_bucket} -> C{x})."""
    return re.sub(r"_(total|bucket|sum|count|created)$", "", sample_name)


def _declared_fleet_metrics():
    """The metric family names the fleet's modules declare (quoted C{anyproxy_fleet_*})."""
    names = set()
    fleet = os.path.join(ROOT, "anyproxy", "fleet")
    for name in os.listdir(fleet):
        if name.endswith(".py"):
            with open(os.path.join(fleet, name)) as f:
                names.update(re.findall(r'"(anyproxy_fleet_[a-z0-9_]+)"', f.read()))
    return names


class GrafanaDashboardTests(unittest.TestCase):
    """deploy/grafana/anyproxy.json queries only metrics AnyProxy exports."""

    timeout = 60

    def setUp(self):
        with open(os.path.join(DEPLOY, "grafana", "anyproxy.json")) as f:
            self.dashboard = json.load(f)

    def queried(self):
        names = set()
        for panel in self.dashboard["panels"]:
            for target in panel.get("targets", ()):
                names.update(_METRIC.findall(target["expr"]))
        for variable in self.dashboard["templating"]["list"]:
            names.update(_METRIC.findall(variable.get("definition", "")))
        return names

    @defer.inlineCallbacks
    def scrape(self, port):
        response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % port)
        self.assertEqual(response.code, 200)
        text = (yield readBody(response)).decode("utf-8")
        return {sample.name for family in text_string_to_metric_families(text)
                for sample in family.samples}

    @defer.inlineCallbacks
    def test_every_metric_exported(self):
        """Every metric a panel or variable queries appears on a gateway's or client's /metrics."""
        deployment = Deployment(self)
        yield deployment.start_gateway(gateway={"metrics_addr": "127.0.0.1:0"})
        client = yield deployment.start_client(client={"metrics_addr": "127.0.0.1:0"})
        gateway_port = deployment.gateway.listeners["metrics"].port.getHost().port
        client_listener = [each for each in client if getattr(each, "what", None) == "metrics"]
        exported = yield self.scrape(gateway_port)
        if client_listener:
            yield client_listener[0].when_listening()
            exported |= yield self.scrape(client_listener[0].port.getHost().port)
        queried = self.queried()
        self.assertTrue(any(name.startswith("anyproxy_client_") for name in queried))
        # The fleet's metrics appear only on a gateway with gateway.fleet (a
        # Redis): those must be declared in the fleet's modules.
        fleet = sorted(name for name in queried - exported if name.startswith("anyproxy_fleet_"))
        self.assertTrue(fleet)
        declared = _declared_fleet_metrics()
        self.assertEqual([name for name in fleet if _family(name) not in declared], [])
        self.assertEqual(sorted(queried - exported - set(fleet)), [])

    def test_panels_well_formed(self):
        """Each panel has a unique id, a place on the grid and, unless a row, a query."""
        ids = [panel["id"] for panel in self.dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in self.dashboard["panels"]:
            self.assertEqual(set(panel["gridPos"]), {"h", "w", "x", "y"})
            self.assertLessEqual(panel["gridPos"]["x"] + panel["gridPos"]["w"], 24)
            if panel["type"] != "row":
                self.assertTrue(panel["targets"], panel["title"])
