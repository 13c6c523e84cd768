#!/usr/bin/env python3
"""
Bulk download through AnyProxy next to a direct download, in one run.

Starts a target web server, a gateway and a client (real twistd processes, on
loopback, certificates from certs/generate.py), then downloads one file with
curl: directly, through the SOCKS5 proxy and through the HTTP proxy, in
interleaved rounds.  Prints MB/s per path (median of the rounds) and the ratio
to the direct download.  Usage: .venv/bin/python benchmarks/tcp_transfer.py [--mb 100] [--rounds 3]
"""

import argparse
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("port %d did not open" % port)


def twistd(*args, log):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                             "-n", "--pidfile="] + list(args), cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def curl_speed(url, *proxy):
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{http_code}"]
                         + list(proxy) + [url], check=True, capture_output=True, text=True).stdout
    speed, code = out.split()
    if code != "200":
        raise SystemExit("HTTP %s from %s" % (code, url))
    return float(speed) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="anyproxy-bench-")
    spec = importlib.util.spec_from_file_location("generate", os.path.join(ROOT, "certs", "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(os.path.join(work, "certs"), ["localhost", "127.0.0.1"])
    www = os.path.join(work, "www")
    os.makedirs(www)
    with open(os.path.join(www, "blob"), "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1024 * 1024))

    ports = {name: free_port() for name in ("target", "gateway", "socks", "http")}
    config = os.path.join(work, "anyproxy.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({
            "proxy": {"socks5": {"listen_addr": "127.0.0.1:%d" % ports["socks"]},
                      "http": {"listen_addr": "127.0.0.1:%d" % ports["http"]}},
            "gateway": {"listen_addr": "127.0.0.1:%d" % ports["gateway"],
                        "tls_cert": "certs/server.crt", "tls_key": "certs/server.key",
                        "auth_username": "bench", "auth_password": "bench-pw"},
            "client": {"gateway_addr": "127.0.0.1:%d" % ports["gateway"],
                       "gateway_tls_cert": "certs/ca.crt", "auth_username": "bench",
                       "auth_password": "bench-pw", "reconnect_initial_delay": 0.2},
        }, f)

    log = open(os.path.join(work, "processes.log"), "w")
    procs = [twistd("web", "--listen", "tcp:%d:interface=127.0.0.1" % ports["target"],
                    "--path", www, log=log),
             twistd("anyproxy-gateway", "--config=" + config, log=log)]
    try:
        wait_port(ports["gateway"])
        procs.append(twistd("anyproxy-client", "--config=" + config, log=log))
        for name in ("target", "socks", "http"):
            wait_port(ports[name])
        url = "http://127.0.0.1:%d/blob" % ports["target"]
        paths = {
            "direct": (),
            "socks5 via tunnel": ("--socks5-hostname", "127.0.0.1:%d" % ports["socks"]),
            "http proxy via tunnel": ("-x", "http://127.0.0.1:%d" % ports["http"]),
        }
        for _ in range(50):  # until the client's tunnel is up
            try:
                curl_speed("http://127.0.0.1:%d/" % ports["target"], *paths["http proxy via tunnel"])
                break
            except (SystemExit, subprocess.CalledProcessError):
                time.sleep(0.2)
        results = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, proxy in paths.items():
                results[name].append(curl_speed(url, *proxy))
        direct = statistics.median(results["direct"])
        print("%d MB download, median of %d rounds, %s" % (args.mb, args.rounds, time.strftime("%Y-%m-%d")))
        print("%-24s %10s %8s" % ("path", "MB/s", "ratio"))
        for name, speeds in results.items():
            median = statistics.median(speeds)
            print("%-24s %10.1f %8.2f" % (name, median, median / direct))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
