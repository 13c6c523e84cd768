"""
End to end through real twistd processes: the plugins as an operator runs
them, with certificates from certs/generate.py and one single-file config.
"""

import importlib.util
import os
import signal
import socket
import sys

import yaml
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.ports import free_port
from tests.support import Echo, blob, listen_tcp, run_curl, web_site
from tests.test_e2e_tcp import socks_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "certs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProcessWatcher(protocol.ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def text(self):
        return b"".join(self.output).decode("utf-8", "replace")


def spawn_twistd(testcase, *args):
    """Start C{twistd -n --pidfile= ARGS}; killed (and awaited) at cleanup."""
    watcher = ProcessWatcher()
    env = {"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}
    transport = reactor.spawnProcess(
        watcher, sys.executable, (sys.executable,) + TWISTD + ("-n", "--pidfile=") + args,
        env=env, path=ROOT)
    watcher.transport = transport

    def stop():
        if not watcher.ended.called:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
        return watcher.ended

    testcase.addCleanup(stop)
    return watcher


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(check, timeout=20, interval=0.1):
    """Poll C{check()} (which may return a Deferred) until it is true."""
    for _ in range(int(timeout / interval)):
        if (yield defer.maybeDeferred(check)):
            return
        yield sleep(interval)
    raise AssertionError("condition not met in %s seconds" % (timeout,))


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def http_answers(port):
    """
    Whether the HTTP proxy on C{port} answers a request: only a running
    reactor does, and only then has twistd installed its SIGTERM handler
    (a listening socket accepts before that, in the kernel).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


class TwistdBase(unittest.TestCase):
    """A config, certificates and targets for twistd processes on loopback."""

    timeout = 120

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        certs = os.path.join(directory, "certs")
        load_generator().generate(certs, ["localhost", "127.0.0.1"])
        self.ports = {name: free_port() for name in ("gateway", "socks", "http")}
        self.target = listen_tcp(self, web_site()).getHost().port
        self.echo = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port
        self.config = os.path.join(directory, "anyproxy.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({
                "proxy": {
                    "socks5": {"listen_addr": "127.0.0.1:%d" % self.ports["socks"],
                               "auth_username": "user", "auth_password": "proxy-pw"},
                    "http": {"listen_addr": "127.0.0.1:%d" % self.ports["http"],
                             "auth_username": "user", "auth_password": "proxy-pw"},
                },
                "gateway": {"listen_addr": "127.0.0.1:%d" % self.ports["gateway"],
                            "tls_cert": "certs/server.crt", "tls_key": "certs/server.key",
                            "auth_username": "tunnel", "auth_password": "tunnel-pw",
                            "ping_interval": 1},
                "client": {"gateway_addr": "127.0.0.1:%d" % self.ports["gateway"],
                           "gateway_tls_cert": "certs/ca.crt", "client_id": "proc-client",
                           "auth_username": "tunnel", "auth_password": "tunnel-pw",
                           "ping_interval": 1, "reconnect_initial_delay": 0.2,
                           "reconnect_max_delay": 1},
            }, f)

    def start_gateway(self):
        return spawn_twistd(self, "anyproxy-gateway", "--config=" + self.config)

    def start_client(self):
        return spawn_twistd(self, "anyproxy-client", "--config=" + self.config)

    @defer.inlineCallbacks
    def served(self, proxy="http"):
        # The HTTP proxy keeps the target connection for reuse (its upstream
        # pool); through SOCKS5 nothing stays open afterwards.
        scheme = {"http": "http", "socks": "socks5h"}[proxy]
        out, _, _ = yield run_curl("-x", "%s://user:proxy-pw@127.0.0.1:%d" % (
                                   scheme, self.ports[proxy]),
                                   "--max-time", "5",
                                   "http://127.0.0.1:%d/blob/100000" % self.target)
        return out == blob(100000)


class TwistdTests(TwistdBase):
    """The gateway and client as twistd plugins in their own processes."""

    @defer.inlineCallbacks
    def test_serves_restarts_and_detects_frozen_client(self):
        """Real processes serve both proxies, survive a gateway kill, and drop a frozen client."""
        gateway = self.start_gateway()
        client = self.start_client()
        yield wait_until(lambda: port_open(self.ports["http"]))
        yield wait_until(self.served)
        out, err, code = yield run_curl(
            "--socks5-hostname", "user:proxy-pw@127.0.0.1:%d" % self.ports["socks"],
            "http://localhost:%d/hello" % self.target)
        self.assertEqual((out, code), (b"hello from the target\n", 0), err)

        # The gateway dies hard and comes back: the client reconnects by itself.
        gateway.transport.signalProcess("KILL")
        yield gateway.ended
        self.start_gateway()
        yield wait_until(self.served)

        # A frozen client is detected by ping timeout and its streams reset.
        sock = yield deferToThread(socks_connect, self.ports["socks"], "127.0.0.1", self.echo,
                                   username="user", password="proxy-pw")
        self.addCleanup(sock.close)
        client.transport.signalProcess(signal.SIGSTOP)
        self.addCleanup(lambda: client.ended.called or client.transport.signalProcess(signal.SIGCONT))
        sock.settimeout(15)
        got = yield deferToThread(lambda: sock.recv(10))
        self.assertEqual(got, b"")  # closed by the gateway, not left hanging
        client.transport.signalProcess(signal.SIGCONT)
        yield wait_until(self.served)

        for watcher in (gateway, client):
            self.assertNotIn("proxy-pw", watcher.text())
            self.assertNotIn("tunnel-pw", watcher.text())

    @defer.inlineCallbacks
    def test_daemonizes_without_n(self):
        """Without -n twistd daemonizes, writing its pidfile and logfile, and serves."""
        directory = os.path.dirname(self.config)
        pidfile = os.path.join(directory, "gateway.pid")
        logfile = os.path.join(directory, "gateway.log")
        watcher = ProcessWatcher()
        reactor.spawnProcess(watcher, sys.executable, (sys.executable,) + TWISTD + (
            "--pidfile=" + pidfile, "--logfile=" + logfile, "anyproxy-gateway",
            "--config=" + self.config), env={"PYTHONPATH": ROOT}, path=ROOT)
        yield watcher.ended  # the parent exits once the daemon is detached
        yield wait_until(lambda: os.path.exists(pidfile) and port_open(self.ports["http"]))
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(kill_quietly, pid)
        yield wait_until(lambda: "listening on" in open(logfile).read())
        yield wait_until(lambda: http_answers(self.ports["http"]))
        os.kill(pid, signal.SIGTERM)
        yield wait_until(lambda: not os.path.exists(pidfile))
        self.assertNotIn("tunnel-pw", open(logfile).read())

    @defer.inlineCallbacks
    def test_bad_config_one_line(self):
        """
        A bad config stops twistd with exit code 1 and one line naming the
        file and the key: no twistd Usage block, no traceback, nothing else.
        """
        with open(self.config) as f:
            data = yaml.safe_load(f)
        data["client"]["forbidden_hosts"] = ["10.0.0.0/33"]
        with open(self.config, "w") as f:
            yaml.safe_dump(data, f)
        watcher = self.start_client()
        ended = yield watcher.ended
        self.assertIsInstance(ended, error.ProcessTerminated)
        self.assertEqual(ended.exitCode, 1)
        lines = watcher.text().splitlines()
        self.assertEqual(len(lines), 1, watcher.text())
        self.assertTrue(lines[0].startswith(self.config + ": client.forbidden_hosts[0]: "),
                        lines[0])

    @defer.inlineCallbacks
    def test_bad_certificate_one_line(self):
        """
        A file the config names that loads but cannot be used (found when
        the service is built) also stops twistd with one line, not a traceback.
        """
        with open(self.config) as f:
            data = yaml.safe_load(f)
        garbage = os.path.join(os.path.dirname(self.config), "not-a-ca.pem")
        with open(garbage, "w") as f:
            f.write("this is not a certificate\n")
        data["client"]["gateway_tls_cert"] = garbage
        with open(self.config, "w") as f:
            yaml.safe_dump(data, f)
        watcher = self.start_client()
        ended = yield watcher.ended
        self.assertEqual(ended.exitCode, 1)
        lines = watcher.text().splitlines()
        self.assertEqual(len(lines), 1, watcher.text())
        self.assertTrue(lines[0].startswith(self.config + ": "), lines[0])
        self.assertIn("not-a-ca.pem", lines[0])

    @defer.inlineCallbacks
    def test_help_lists_plugins(self):
        """twistd --help lists both AnyProxy plugins."""
        watcher = ProcessWatcher()
        reactor.spawnProcess(watcher, sys.executable, (sys.executable,) + TWISTD + ("--help",),
                             env={"PYTHONPATH": ROOT}, path=ROOT)
        yield watcher.ended
        self.assertIn("anyproxy-gateway", watcher.text())
        self.assertIn("anyproxy-client", watcher.text())


class FrozenClientFailoverTests(TwistdBase):
    """With two client processes, freezing one moves service to the other."""

    def second_client(self):
        with open(self.config) as f:
            data = yaml.safe_load(f)
        data["client"]["client_id"] = "proc-client-2"
        path = os.path.join(os.path.dirname(self.config), "client-2.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"client": data["client"]}, f)
        return spawn_twistd(self, "anyproxy-client", "--config=" + path)

    @defer.inlineCallbacks
    def test_frozen_client_streams_reset_others_serve(self):
        """SIGSTOP one of two clients: its stream is reset by ping timeout, new streams succeed."""
        gateway = self.start_gateway()
        first = self.start_client()
        self.second_client()
        yield wait_until(lambda: port_open(self.ports["socks"]))
        yield wait_until(lambda: "client proc-client group" in gateway.text()
                         and "client proc-client-2 group" in gateway.text())
        yield wait_until(lambda: self.served("socks"))

        def open_two():
            socks = [socks_connect(self.ports["socks"], "127.0.0.1", self.echo,
                                   username="user", password="proxy-pw") for _ in range(2)]
            for sock in socks:
                sock.sendall(b"ping")
                if sock.recv(4) != b"ping":
                    raise AssertionError("no echo")
            return socks

        # Two clients, least-streams balancing: one stream on each.
        socks = yield deferToThread(open_two)
        self.addCleanup(lambda: [s.close() for s in socks])
        first.transport.signalProcess(signal.SIGSTOP)
        self.addCleanup(lambda: first.ended.called or first.transport.signalProcess(signal.SIGCONT))
        frozen_at = reactor.seconds()

        def which_closed():
            import select
            readable, _, _ = select.select(socks, [], [], 15)
            return [s.recv(10) for s in readable]

        got = yield deferToThread(which_closed)
        detected = reactor.seconds() - frozen_at
        self.assertIn(b"", got)  # the frozen client's stream was closed, not left hanging
        served = yield self.served()  # and new streams go to the other client
        self.assertTrue(served)
        print("\nfrozen client detected and its stream reset after %.1f s" % (detected,))
