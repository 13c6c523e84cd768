"""
The client reaching its gateway only through an egress proxy: Debian's squid
(HTTP CONNECT, Basic auth by its C{basic_ncsa_auth} helper over an htpasswd
file of Apache MD5 hashes made with C{openssl passwd -apr1}) and Debian's
microsocks (SOCKS5 with a username and password), each started by the test
on a free loopback port.  The gateway and client run in this process.

How the gateway is made unreachable except through the proxy: it listens on
a second loopback address, 127.0.0.7, and an iptables rule in the OUTPUT
chain rejects (TCP reset) every locally made connection to its port whose
socket does not belong to the C{proxy} user (uid of Debian's squid, which
drops to it; microsocks is started as that user with C{setpriv}).  The
owner match works for locally generated packets, so the test process (root)
cannot dial the gateway itself, and each test checks that first.  The rule
names only that address and port and is removed at cleanup.  This needs
root and a working iptables (CI runs as root on a fresh Debian machine;
.ci/run installs squid, microsocks and iptables); elsewhere the tests skip.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial import unittest

from anyproxy.config.load import load_config
from tests.ports import free_port
from tests.support import Deployment, Echo, SecretWatch, listen_tcp
from tests.test_e2e_tcp import socks_echo

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
MICROSOCKS = "/usr/bin/microsocks"
GATEWAY_HOST = "127.0.0.7"
PROXY_USER = "corp-user"
PROXY_PASSWORD = "s3cret-egress-pw"
WRONG_PASSWORD = "s3cret-wrong-pw"


def _skip_reason():
    if os.geteuid() != 0:
        return "needs root (an iptables rule and a process started as the proxy user)"
    for path in (SQUID, NCSA_AUTH, MICROSOCKS):
        if not os.path.exists(path):
            return "%s is not installed (.ci/run installs squid and microsocks)" % (path,)
    if shutil.which("iptables") is None or shutil.which("openssl") is None:
        return "iptables and openssl are needed"
    try:
        pwd.getpwnam("proxy")
    except KeyError:
        return "no 'proxy' user (Debian's squid package creates it)"
    check = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True)
    if check.returncode != 0:
        return "iptables does not work here: %s" % (check.stderr.decode()[:200],)
    return None


SKIP = _skip_reason()


@defer.inlineCallbacks
def wait_for_port(port, process, errors=None, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = ""
            if errors is not None:
                with open(errors, errors="replace") as f:
                    said = ": " + f.read()[-1000:]
            raise AssertionError("the proxy exited with status %s%s" % (process.returncode, said))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("the proxy did not listen on %d within %gs" % (port, timeout))


def stop_process(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _EgressBase(unittest.TestCase):
    timeout = 60
    skip = SKIP

    @defer.inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(self)
        self.log = SecretWatch(self, secrets=[PROXY_PASSWORD, WRONG_PASSWORD])
        self.proxy_uid = pwd.getpwnam("proxy").pw_uid
        self.proxy_gid = pwd.getpwnam("proxy").pw_gid
        yield self.deployment.start_gateway(gateway={"listen_addr": GATEWAY_HOST + ":0"})
        self.gateway_port = self.deployment.gateway_port
        self.block_direct_dials()
        self.echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

    def block_direct_dials(self):
        rule = ["OUTPUT", "-o", "lo", "-d", GATEWAY_HOST, "-p", "tcp",
                "--dport", str(self.gateway_port), "-m", "owner", "!", "--uid-owner",
                str(self.proxy_uid), "-j", "REJECT", "--reject-with", "tcp-reset"]
        subprocess.run(["iptables", "-I"] + rule, check=True, capture_output=True)
        self.addCleanup(subprocess.run, ["iptables", "-D"] + rule, capture_output=True)
        # The rule holds: this process cannot reach the gateway itself.
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((GATEWAY_HOST, self.gateway_port), timeout=5).close()

    def start_client(self, egress_proxy, wait=True, gateway_port=None, **client):
        settings = {"gateway_addr": "%s:%d" % (GATEWAY_HOST, gateway_port or self.gateway_port),
                    "gateway_server_name": "localhost", "egress_proxy": egress_proxy}
        settings.update(client)
        return self.deployment.start_client(wait=wait, client=settings)

    @defer.inlineCallbacks
    def wait_for_log(self, text, timeout=15.0):
        """The first formatted log line containing C{text}."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.log.events:
                line = formatEvent(event)
                if text in line:
                    return line
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("no log line with %r" % (text,))

    @defer.inlineCallbacks
    def assert_carries_traffic(self):
        payload = os.urandom(100000)
        echoed = yield deferToThread(socks_echo, self.deployment.socks_port, "127.0.0.1",
                                     self.echo_port, payload)
        self.assertEqual(echoed, payload)


class SquidTests(_EgressBase):
    """The gateway reached only through squid, with Basic auth."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        # Not under the test's own directory: squid, as the proxy user, must
        # reach its files, and the checkout's parents need not be traversable.
        directory = tempfile.mkdtemp(prefix="anyproxy-squid-")
        self.addCleanup(shutil.rmtree, directory, True)
        hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], check=True,
                                input=PROXY_PASSWORD.encode(), capture_output=True).stdout
        with open(os.path.join(directory, "htpasswd"), "wb") as f:
            f.write(PROXY_USER.encode() + b":" + hashed.strip() + b"\n")
        self.squid_port = free_port()
        self.directory = directory
        with open(os.path.join(directory, "squid.conf"), "w") as f:
            f.write(SQUID_CONF.format(dir=directory, port=self.squid_port, auth=NCSA_AUTH,
                                      gateway=GATEWAY_HOST, gateway_port=self.gateway_port))
        os.chown(directory, self.proxy_uid, self.proxy_gid)
        for name in os.listdir(directory):
            os.chown(os.path.join(directory, name), self.proxy_uid, self.proxy_gid)
        with open(os.path.join(directory, "squid.stderr"), "wb") as stderr:
            squid = subprocess.Popen([SQUID, "-N", "-d", "1", "-f",
                                      os.path.join(directory, "squid.conf")],
                                     stdout=subprocess.DEVNULL, stderr=stderr)
        self.addCleanup(stop_process, squid)
        yield wait_for_port(self.squid_port, squid, os.path.join(directory, "squid.stderr"))

    def url(self, password=PROXY_PASSWORD):
        return "http://%s:%s@127.0.0.1:%d" % (PROXY_USER, password, self.squid_port)

    def access_log(self):
        with open(os.path.join(self.directory, "access.log")) as f:
            return f.read()

    @defer.inlineCallbacks
    def test_tunnel_through_squid(self):
        """The tunnel comes up through squid (its access log shows the CONNECT) and carries streams."""
        client = yield self.start_client(self.url())
        yield self.assert_carries_traffic()
        yield self.wait_for_log("dialed through egress proxy http://127.0.0.1:%d"
                                % (self.squid_port,))
        # Squid logs a CONNECT when it ends.
        yield client.stopService()
        deadline = time.monotonic() + 10
        while "CONNECT %s:%d" % (GATEWAY_HOST, self.gateway_port) not in self.access_log():
            self.assertLess(time.monotonic(), deadline, self.access_log())
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn(PROXY_USER, self.access_log())

    @defer.inlineCallbacks
    def test_wrong_password_then_reload(self):
        """A wrong proxy password logs squid's 407; a reload with the right one connects."""
        client = yield self.start_client(self.url(WRONG_PASSWORD), wait=False)
        line = yield self.wait_for_log("refused CONNECT")
        self.assertIn("egress proxy http://127.0.0.1:%d refused CONNECT %s:%d: 407"
                      % (self.squid_port, GATEWAY_HOST, self.gateway_port), line)
        self.assertIn("cannot connect", line)
        self.assertNotIn(WRONG_PASSWORD, line)
        config = load_config(self.deployment.write_config(self.deployment.client_config(client={
            "gateway_addr": "%s:%d" % (GATEWAY_HOST, self.gateway_port),
            "gateway_server_name": "localhost", "egress_proxy": self.url()})))
        yield client.reconfigure(config)
        yield self.deployment.wait_for_tunnel()
        yield self.assert_carries_traffic()
        yield client.stopService()

    @defer.inlineCallbacks
    def test_proxy_refuses_the_target(self):
        """A gateway port squid's rules do not allow gets squid's 403, naming the proxy hop."""
        other = free_port(hosts=(GATEWAY_HOST,))
        yield self.start_client(self.url(), wait=False, gateway_port=other)
        line = yield self.wait_for_log("refused CONNECT")
        self.assertIn("egress proxy http://127.0.0.1:%d refused CONNECT %s:%d: 403"
                      % (self.squid_port, GATEWAY_HOST, other), line)


SQUID_CONF = """\
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
coredump_dir {dir}
cache deny all
cache_mem 1 MB
pinger_enable off
visible_hostname anyproxy-egress-test
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
auth_param basic program {auth} {dir}/htpasswd
auth_param basic children 1 startup=1
auth_param basic realm anyproxy-egress-test
acl authed proxy_auth REQUIRED
acl gateway dst {gateway}/32
acl gateway_port port {gateway_port}
acl CONNECT method CONNECT
http_access deny !authed
http_access allow CONNECT gateway gateway_port
http_access deny all
"""


class Socks5Tests(_EgressBase):
    """The gateway reached only through a SOCKS5 proxy (microsocks) with a login."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.socks_port = free_port()
        microsocks = subprocess.Popen(
            ["setpriv", "--reuid=%d" % (self.proxy_uid,), "--regid=%d" % (self.proxy_gid,),
             "--clear-groups", MICROSOCKS, "-i", "127.0.0.1", "-p", str(self.socks_port),
             "-u", PROXY_USER, "-P", PROXY_PASSWORD],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stop_process, microsocks)
        yield wait_for_port(self.socks_port, microsocks)

    def url(self, password=PROXY_PASSWORD):
        return "socks5://%s:%s@127.0.0.1:%d" % (PROXY_USER, password, self.socks_port)

    @defer.inlineCallbacks
    def test_tunnel_through_socks5(self):
        """The tunnel comes up through the SOCKS5 proxy and carries streams."""
        yield self.start_client(self.url())
        yield self.assert_carries_traffic()

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong SOCKS5 password is reported as the proxy refusing the login."""
        yield self.start_client(self.url(WRONG_PASSWORD), wait=False)
        line = yield self.wait_for_log("refused the username and password")
        self.assertIn("egress proxy socks5://127.0.0.1:%d (SOCKS5)" % (self.socks_port,), line)


class DirectTests(_EgressBase):
    """Without the proxy the client cannot reach the gateway: the rule is in force."""

    @defer.inlineCallbacks
    def test_direct_dial_refused(self):
        """A client dialing directly logs the gateway hop's refusal."""
        yield self.start_client("", wait=False)
        line = yield self.wait_for_log("cannot connect")
        self.assertIn("refused", line.lower())
        self.assertNotIn("egress proxy", line)
