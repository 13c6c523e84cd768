"""
What every benchmark shares: the places, the units, the log line and the
error that ends a run.

The rest of the harness, one module each:

- ``processes``: the temporary directory and the child processes, free ports;
- ``services``: AnyProxy, the targets and the peers, started on loopback (its
  configs and certificates), and the check that their tools are installed;
- ``clients``: small SOCKS5, HTTP proxy and UDP clients the measurements use;
- ``memory``: RSS and descriptors of the gateway and the client;
- ``measurement``: what a measurement module provides (L{Measurement}) and
  how its typed result goes to and from JSON;
- ``report``: the table's rows, formatting, the Markdown report and latest.json;
- ``chart``: panels of bars, drawn with matplotlib into latest.png;
- ``page_site`` and ``browser``: page_load's https site (nginx) and its
  headless Chromium (Playwright).

The measurements themselves live in ``benchmarks/measurements/``.
"""

import os
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LOOPBACK = "127.0.0.1"
# iperf3 listens on a second loopback address so that the proxychains configs
# can exclude 127.0.0.1 (the proxies themselves, the other local services)
# and send only the iperf3 target through the proxy under test.
IPERF_HOST = "127.0.0.2"
MiB = 1024 * 1024
KiB = 1024


def log(msg, *args):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg % args if args else msg), flush=True)


class BenchError(Exception):
    """A run failed: said on stderr, the processes stopped, exit status 1."""
