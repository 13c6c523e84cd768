"""
AnyProxy, the targets and the peers, started on loopback with free ports for
the measurements of one run; what each needs installed.

What a measurement may ask for (its ``needs``) besides AnyProxy and the TCP
targets, which always run:

- ``iperf3``: an iperf3 server on 127.0.0.2 (``Services.iperf`` runs a client);
- ``pproxy``: pproxy's SOCKS5 and HTTP listeners;
- ``microsocks``: microsocks' SOCKS5 listener;
- ``openssh``: a throwaway sshd and two ``ssh -R PORT`` clients (default
  cipher and aes128-gcm), each offering SOCKS5 on the sshd side;
- ``udp_echo``: the UDP echo target (and a check that AnyProxy relays UDP).

Every SOCKS5 path started lands in ``Services.socks`` and every HTTP proxy
in ``Services.http`` (name -> port), in the order above, AnyProxy first.
"""

import getpass
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import yaml

from harness import HERE, IPERF_HOST, LOOPBACK, ROOT, BenchError, log
from harness.clients import echo_check, http_proxy_check, open_udp_path
from harness.processes import free_port, retry, wait_port

# AnyProxy's HTTP proxy with its upstream pool off (upstream_keepalive: 0).
NO_REUSE = "AnyProxy, upstream_keepalive: 0"

# The commands (or, for pproxy, the Python module) each need wants installed.
NEEDS = {
    "iperf3": ("iperf3",),
    "pproxy": ("python:pproxy",),
    "microsocks": ("microsocks",),
    "openssh": ("ssh", "ssh-keygen", "sshd"),
    "udp_echo": (),
}


def sbin_path(tool):
    """C{tool} on PATH, or in /usr/sbin (where sshd and nginx live; a user's PATH may lack it), or None."""
    return shutil.which(tool) or ("/usr/sbin/" + tool if os.access("/usr/sbin/" + tool, os.X_OK) else None)


def sshd_path():
    return sbin_path("sshd")


def missing(needs, tools):
    """What of C{needs} (keys of L{NEEDS}) and C{tools} (commands) is not installed."""
    wanted = list(tools)
    for need in needs:
        wanted += NEEDS[need]
    out = []
    for tool in dict.fromkeys(wanted):
        if tool.startswith("python:"):
            if importlib.util.find_spec(tool.split(":", 1)[1]) is None:
                out.append(tool.split(":", 1)[1] + " (Python)")
        elif sbin_path(tool) is None:
            out.append(tool)
    return out


def load_generate():
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "certs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_window():
    """The tunnel's flow-control window (DEFAULT_WINDOW in anyproxy/tunnel/stream.py)."""
    try:
        with open(os.path.join(ROOT, "anyproxy", "tunnel", "stream.py")) as f:
            text = f.read()
        m = re.search(r"^DEFAULT_WINDOW\s*=\s*([0-9 *]+)$", text, re.M)
        value = 1
        for factor in m.group(1).split("*"):
            value *= int(factor)
        return value
    except (OSError, AttributeError, ValueError):
        return 1024 * 1024


class Services:
    """Starts AnyProxy, the peers and the targets that the chosen measurements need."""

    def __init__(self, processes, args, needs=frozenset(), max_streams=0):
        self.processes = processes
        self.args = args
        self.needs = frozenset(needs)
        self.max_streams = max_streams  # streams a measurement holds open at once
        self.ports = {}
        self.socks = {}   # path name -> SOCKS5 port
        self.http = {}    # path name -> HTTP proxy port
        self.gateway = self.client = None

    def port(self, name, kind=socket.SOCK_STREAM):
        self.ports[name] = free_port(kind)
        return self.ports[name]

    def twistd(self, name, *args):
        """
        A twistd process of this tree (AnyProxy's plugins), in the foreground,
        logging to C{name}.log; under cProfile with C{--profile DIR}, whose
        C{name}.pstats twistd writes when the process stops.
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        profile = []
        if getattr(self.args, "profile", None):
            os.makedirs(self.args.profile, exist_ok=True)
            profile = ["--profile=" + os.path.join(os.path.abspath(self.args.profile), name + ".pstats"),
                       "--profiler=cprofile", "--savestats"]
        return self.processes.spawn(name, [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                                           "-n", "--pidfile="] + profile + list(args), env=env, cwd=ROOT)

    def start(self):
        self.start_targets()
        self.start_anyproxy()
        if "iperf3" in self.needs:
            self.start_iperf()
        if "pproxy" in self.needs:
            self.start_pproxy()
        if "microsocks" in self.needs:
            self.start_microsocks()
        if "openssh" in self.needs:
            self.start_ssh()
        self.check_paths()

    def start_targets(self):
        argv = [sys.executable, os.path.join(HERE, "targets.py"), "--host", LOOPBACK,
                "--echo", str(self.port("echo")), "--http", str(self.port("http_target")),
                "--source", str(self.port("source"))]
        if "udp_echo" in self.needs:
            argv += ["--udp-echo", str(self.port("udp_echo", socket.SOCK_DGRAM))]
        self.processes.spawn("targets", argv)
        for name in ("echo", "http_target", "source"):
            wait_port(self.ports[name], processes=self.processes, names=("targets",))
        if "udp_echo" in self.needs:
            retry("UDP echo", lambda: open_udp_path(self.ports["udp_echo"]).close(),
                  timeout=15, processes=self.processes, names=("targets",))

    def anyproxy_config(self, certs):
        """Gateway and client in one file: SOCKS5, HTTP and the HTTP proxy without upstream reuse."""
        return {
            "log": {"level": self.args.anyproxy_log_level},
            "proxy": {"socks5": {"listen_addr": "%s:%d" % (LOOPBACK, self.ports["anyproxy_socks"])},
                      "http": {"listen_addr": "%s:%d" % (LOOPBACK, self.ports["anyproxy_http"])},
                      # The same proxy without upstream reuse (each request its own
                      # stream and target connection), measured beside it for comparison.
                      "frontends": [{"type": "http",
                                     "listen_addr": "%s:%d" % (LOOPBACK, self.ports["anyproxy_http_no_reuse"]),
                                     "options": {"upstream_keepalive": 0}}]},
            "gateway": {"listen_addr": "%s:%d" % (LOOPBACK, self.ports["gateway"]),
                        "tls_cert": os.path.join(certs, "server.crt"),
                        "tls_key": os.path.join(certs, "server.key"),
                        "auth_username": "bench", "auth_password": "bench-password",
                        # One user opens every stream here: no per-user share
                        # (anonymous users are not counted anyway).
                        "max_conns_per_user": 0},
            "client": {"gateway_addr": "%s:%d" % (LOOPBACK, self.ports["gateway"]),
                       "gateway_tls_cert": os.path.join(certs, "ca.crt"),
                       "client_id": "bench", "replicas": 1,
                       "auth_username": "bench", "auth_password": "bench-password",
                       "max_concurrent_conns": self.max_streams + 1000,
                       "reconnect_initial_delay": 0.2},
        }

    def start_anyproxy(self):
        certs = self.processes.path("certs")
        load_generate().generate(certs, ["localhost", LOOPBACK])
        for name in ("gateway", "anyproxy_socks", "anyproxy_http", "anyproxy_http_no_reuse"):
            self.port(name)
        config = self.processes.path("anyproxy.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(self.anyproxy_config(certs), f)
        self.gateway = self.twistd("gateway", "anyproxy-gateway", "--config=" + config)
        wait_port(self.ports["gateway"], processes=self.processes, names=("gateway",))
        self.client = self.twistd("client", "anyproxy-client", "--config=" + config)
        socks, http, no_reuse = (self.ports[n] for n in ("anyproxy_socks", "anyproxy_http",
                                                          "anyproxy_http_no_reuse"))
        for port in (socks, http, no_reuse):
            wait_port(port, processes=self.processes, names=("gateway", "client"))
        retry("AnyProxy tunnel", lambda: echo_check(socks, self.ports["echo"]),
              processes=self.processes, names=("gateway", "client"))
        self.socks["AnyProxy"] = socks
        self.http["AnyProxy"] = http
        self.http[NO_REUSE] = no_reuse

    def start_iperf(self):
        self.port("iperf")
        self.restart_iperf()

    def restart_iperf(self):
        self.processes.stop("iperf3")
        self.processes.spawn("iperf3", ["iperf3", "-s", "-B", IPERF_HOST, "-p", str(self.ports["iperf"])])
        wait_port(self.ports["iperf"], host=IPERF_HOST, processes=self.processes, names=("iperf3",))
        time.sleep(0.2)

    def start_pproxy(self):
        socks, http = self.port("pproxy_socks"), self.port("pproxy_http")
        self.processes.spawn("pproxy", [sys.executable, "-m", "pproxy",
                                        "-l", "socks5://%s:%d" % (LOOPBACK, socks),
                                        "-l", "http://%s:%d" % (LOOPBACK, http)])
        for port in (socks, http):
            wait_port(port, processes=self.processes, names=("pproxy",))
        self.socks["pproxy"] = socks
        self.http["pproxy"] = http

    def start_microsocks(self):
        port = self.port("microsocks")
        self.processes.spawn("microsocks", ["microsocks", "-i", LOOPBACK, "-p", str(port)])
        wait_port(port, processes=self.processes, names=("microsocks",))
        self.socks["microsocks"] = port

    def ssh_connect_port(self, port):
        """The port ssh dials to reach the sshd on C{port} (a subclass may put a relay there)."""
        return port

    def start_ssh(self):
        """A throwaway sshd; ssh -R PORT from "inside" offers SOCKS5 on the sshd side."""
        sshd = sshd_path()
        d = self.processes.path("ssh")
        os.makedirs(d, mode=0o700)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "anyproxy-bench",
                            "-f", os.path.join(d, key)], check=True)
        shutil.copy(os.path.join(d, "user_key.pub"), os.path.join(d, "authorized_keys"))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        port = self.port("sshd")
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "ListenAddress %s:%d" % (LOOPBACK, port),
                "HostKey %s" % os.path.join(d, "host_key"),
                "AuthorizedKeysFile %s" % os.path.join(d, "authorized_keys"),
                "PidFile none", "UsePAM no", "StrictModes no", "UseDNS no",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes", "GatewayPorts no", "PermitTTY no",
                "X11Forwarding no", "PrintMotd no", "LogLevel ERROR", ""]))
        subprocess.run([sshd, "-t", "-f", config], check=True)
        self.processes.spawn("sshd", [sshd, "-D", "-e", "-f", config])
        wait_port(port, processes=self.processes, names=("sshd",))
        self._sshd_port = port
        for name, cipher in (("OpenSSH -R", None), ("OpenSSH -R aes128-gcm", "aes128-gcm@openssh.com")):
            socks = self.port(name)
            self.ssh_remote("ssh-gcm" if cipher else "ssh", "%s:%d" % (LOOPBACK, socks), cipher)
            self.socks[name] = socks

    def ssh_remote(self, proc_name, forward, cipher=None):
        """
        C{ssh -N -R FORWARD} from "inside" to the sshd of L{start_ssh}, as
        process C{proc_name}: FORWARD is C{host:port} (SOCKS5 on the sshd
        side) or C{host:port:target_host:target_port} (a forwarded port).
        Returns once the sshd side listens.
        """
        d = self.processes.path("ssh")
        argv = ["ssh", "-N", "-F", "/dev/null", "-p", str(self.ssh_connect_port(self._sshd_port)),
                "-i", os.path.join(d, "user_key"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", "-R", forward]
        if cipher:
            argv += ["-c", cipher]
        argv.append("%s@%s" % (getpass.getuser(), LOOPBACK))
        self.processes.spawn(proc_name, argv)
        host, port = forward.split(":")[:2]
        wait_port(int(port), host=host, processes=self.processes, names=(proc_name, "sshd"))

    def check_paths(self):
        for name, port in self.socks.items():
            retry("SOCKS5 via " + name, lambda: echo_check(port, self.ports["echo"]), timeout=15)
        for name, port in self.http.items():
            retry("HTTP proxy via " + name, lambda: http_proxy_check(port, self.ports["http_target"]),
                  timeout=15)
        if "udp_echo" in self.needs:
            retry("SOCKS5 UDP ASSOCIATE via AnyProxy",
                  lambda: open_udp_path(self.ports["udp_echo"], self.socks["AnyProxy"]).close(), timeout=15)
        log("ready: %s", ", ".join("%s :%d" % kv for kv in sorted(self.ports.items())))

    def write_proxychains(self, name, port):
        """A proxychains4 config that sends only the iperf3 target through the SOCKS5 proxy on C{port}."""
        path = self.processes.path("proxychains-%s.conf" % re.sub(r"\W+", "-", name))
        with open(path, "w") as f:
            f.write("\n".join([
                "# generated by benchmarks/bench.py",
                "strict_chain",
                "quiet_mode",
                "# proxy_dns is off: iperf3 is given an address, nothing is resolved",
                "tcp_read_time_out 15000",
                "tcp_connect_time_out 8000",
                "# only the iperf3 target (%s) goes through the proxy" % IPERF_HOST,
                "localnet 127.0.0.1/255.255.255.255",
                "[ProxyList]",
                "socks5 %s %d" % (LOOPBACK, port), ""]))
        return path

    def iperf(self, conf, seconds, reverse, omit):
        """
        One iperf3 run to the iperf3 server, through proxychains4 with C{conf}
        (None: directly); Mbit/s received, or None after three failed tries.
        """
        argv = ["iperf3", "-c", IPERF_HOST, "-p", str(self.ports["iperf"]), "-t", str(seconds),
                "-O", str(omit), "-J", "--connect-timeout", "5000"]
        if reverse:
            argv.append("-R")
        if conf:
            argv = ["proxychains4", "-q", "-f", conf] + argv
        for attempt in (1, 2, 3):
            time.sleep(0.5)  # the server finishes the previous test after its client has exited
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + omit + 30)
                result = json.loads(out.stdout)
                if "error" in result:
                    raise BenchError(result["error"])
                return result["end"]["sum_received"]["bits_per_second"] / 1e6
            except (subprocess.TimeoutExpired, ValueError, KeyError, BenchError) as e:
                text = str(e).splitlines()[0] if str(e) else repr(e)
                log("  iperf3 failed (attempt %d): %s", attempt, text)
                if "busy" in text:
                    time.sleep(2)
                else:
                    self.restart_iperf()  # a half-finished test can leave the server stuck
        return None
