"""RSS and open descriptors of the gateway and the client (psutil)."""

import contextlib
import threading
import time

import attr

try:
    import psutil
except ImportError:  # Sample still serves selfcheck.py
    psutil = None

from harness import MiB


@attr.s(frozen=True, auto_attribs=True)
class Sample:
    """One look at the gateway and the client: RSS in bytes, open descriptors."""
    gateway: int
    gateway_fds: int
    client: int
    client_fds: int
    total: int  # gateway + client RSS

    def rss(self, side):
        """C{side}'s RSS: "gateway", "client" or "total"."""
        return getattr(self, side)

    def fds(self, side):
        return getattr(self, side + "_fds")


class Rss:
    """Samples the gateway and the client."""

    def __init__(self, pids):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def sample(self):
        gateway, client = self.procs["gateway"], self.procs["client"]
        gateway_rss, client_rss = gateway.memory_info().rss, client.memory_info().rss
        return Sample(gateway=gateway_rss, gateway_fds=gateway.num_fds(),
                      client=client_rss, client_fds=client.num_fds(), total=gateway_rss + client_rss)

    def settle(self, quiet=0.2 * MiB, interval=0.5, limit=8.0):
        """Sample until the total stops moving (or C{limit} seconds)."""
        last = self.sample()
        deadline = time.time() + limit
        while time.time() < deadline:
            time.sleep(interval)
            now = self.sample()
            if abs(now.total - last.total) < quiet:
                return now
            last = now
        return last


class PeakSampler(threading.Thread):
    """Keeps the highest RSS seen per process while a block runs (the descriptors of the first sample)."""

    def __init__(self, rss, interval=0.2):
        super().__init__(daemon=True)
        self.rss, self.interval = rss, interval
        self.peak = rss.sample()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                now = self.rss.sample()
                self.peak = attr.evolve(self.peak, **{key: max(self.peak.rss(key), now.rss(key))
                                                      for key in ("gateway", "client", "total")})

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self.join()
