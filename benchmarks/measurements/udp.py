"""
6. udp: the UDP echo, directly ("direct (no proxy)") and through AnyProxy
(SOCKS5 UDP ASSOCIATE to the gateway, a udp stream through the tunnel, the
client sends to the echo).  Every datagram carries a sequence number; an
answer counts if it has the same header, the right length and the number of
a datagram still waiting.  One new association per path and round; the two
paths take turns, ``--seconds`` per run:

- ping-pong: one 100-byte datagram at a time; round trips/s;
- burst: 1,200-byte datagrams, ``--udp-window`` in flight, a new one for
  every answer; datagrams/s and Mbit/s of payload answered within the run.

Through AnyProxy, each run also reports the CPU time (user + system) that
the gateway and the client spent per datagram sent, a figure that the other
programs sharing the machine disturb far less than the rates.

A datagram without an answer after 0.25 s counts as lost.  None of the peers
relays SOCKS5 UDP (see benchmarks/README.md), so the comparison is with the
direct path only.
"""

import collections
import select
import socket
import struct
import time
import typing

import attr

from harness import BenchError, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.clients import open_udp_path
from harness.cpu_time import cpu_seconds
from harness.measurement import Measurement, Option
from harness.processes import retry
from harness.report import Row, fmt, median, num, ratio

DIRECT = "direct (no proxy)"
KINDS = ("pingpong", "burst")
# Datagram sizes (payload, SOCKS5 header not counted), the burst's datagrams
# in flight (--udp-window), and how long an answer may take before its
# datagram counts as lost (answers take a few milliseconds at most here).
UDP_PING_SIZE = 100
UDP_BURST_SIZE = 1200
UDP_WINDOW = 64
UDP_LOSS_TIMEOUT = 0.25
UDP_SEQ = struct.Struct("!Q")  # every datagram starts with its sequence number


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class UdpRun:
    rate: float                            # round trips/s (ping-pong) or datagrams/s (burst) answered
    mbps: typing.Optional[float] = None    # burst only: Mbit/s of payload answered
    sent: int
    lost: int                              # no answer within UDP_LOSS_TIMEOUT
    late: int                              # answers after that
    bad: int                               # malformed answers
    seconds: float
    cpu_us: typing.Optional[float] = None  # AnyProxy only: gateway + client CPU µs per datagram sent


@attr.s(frozen=True, auto_attribs=True)
class UdpResult:
    # (path, "pingpong" or "burst") -> one run per round; None: the run failed
    runs: typing.Dict[typing.Tuple[str, str], typing.List[typing.Optional[UdpRun]]]
    paths: typing.List[str]
    window: int  # burst datagrams in flight

    def median(self, path, kind, key):
        return median([getattr(x, key) for x in self.runs[(path, kind)] if x])

    def lost(self, path, kind):
        """(lost, sent) over the runs that finished."""
        done = [x for x in self.runs[(path, kind)] if x]
        return sum(x.lost for x in done), sum(x.sent for x in done)

    def loss_text(self, path, kind):
        """Datagrams lost over every run that finished, as text."""
        results = self.runs[(path, kind)]
        done = [x for x in results if x]
        lost, sent = self.lost(path, kind)
        text = "lost %s%% (%s of %s)" % (fmt(100 * lost / sent if sent else None, "%.2g"), num(lost), num(sent))
        bad = sum(x.bad for x in done)
        if bad:
            text += ", %d malformed" % bad
        if len(done) < len(results):
            text += ", %d of %d runs failed" % (len(results) - len(done), len(results))
        return text


def udp_pingpong(path, seconds, size=UDP_PING_SIZE, timeout=UDP_LOSS_TIMEOUT):
    """One datagram at a time: send, wait for its echo (or C{timeout}: lost), repeat."""
    sock, header, address = path.sock, path.header, path.address
    offset, expected = len(header), len(header) + size
    pad = b"\x5a" * (size - UDP_SEQ.size)
    sock.settimeout(timeout)
    seq = done = lost = late = bad = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        sock.sendto(header + UDP_SEQ.pack(seq) + pad, address)
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                lost += 1
                if not path.alive():
                    raise BenchError("the proxy ended the UDP association")
                break
            if len(data) != expected or not data.startswith(header):
                bad += 1
            elif UDP_SEQ.unpack_from(data, offset)[0] == seq:
                done += 1
                break
            else:
                late += 1  # to an earlier datagram; ours may still come
        seq += 1
    elapsed = time.monotonic() - start
    return UdpRun(rate=done / elapsed, sent=seq, lost=lost, late=late, bad=bad, seconds=elapsed)


def udp_burst(path, seconds, window, size=UDP_BURST_SIZE, timeout=UDP_LOSS_TIMEOUT):
    """
    Keep C{window} datagrams in flight for C{seconds}: a new one goes out for
    every answer, and for every datagram unanswered after C{timeout} (lost;
    an answer after that counts as late).  The rate counts the answers that
    came within C{seconds}; then the last datagrams get C{timeout} to come back.
    """
    sock, header, address = path.sock, path.header, path.address
    offset, expected = len(header), len(header) + size
    pad = b"\xa5" * (size - UDP_SEQ.size)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if path.control is not None:
        poller.register(path.control, select.POLLIN)  # readable: the proxy closed it
    flying = collections.OrderedDict()  # seq -> when sent, oldest first
    seq = answered = lost = late = bad = 0
    counted = elapsed = None
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now < end:
            while len(flying) < window:
                try:
                    sock.sendto(header + UDP_SEQ.pack(seq) + pad, address)
                except (BlockingIOError, InterruptedError):
                    break  # send buffer full: answers first
                flying[seq] = now
                seq += 1
        elif counted is None:
            counted, elapsed = answered, now - start
        while flying:
            oldest = next(iter(flying.values()))
            if now - oldest < timeout:
                break
            flying.popitem(last=False)
            lost += 1
        if counted is not None and not flying:
            break
        if counted is not None:  # the last ones: until the oldest is due
            wait = next(iter(flying.values())) + timeout - now
        elif len(flying) >= window:  # for an answer, or until the oldest is due or the end
            wait = min(next(iter(flying.values())) + timeout, end) - now
        else:  # the send buffer was full
            wait = 0.001
        for fd, _ in poller.poll(max(0.0, wait) * 1000):
            if fd != sock.fileno():
                if not path.alive():
                    raise BenchError("the proxy ended the UDP association")
                continue
            while True:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if len(data) != expected or not data.startswith(header):
                    bad += 1
                elif flying.pop(UDP_SEQ.unpack_from(data, offset)[0], None) is None:
                    late += 1
                else:
                    answered += 1
    return UdpRun(rate=counted / elapsed, mbps=counted * size * 8 / elapsed / 1e6, sent=seq,
                  lost=lost, late=late, bad=bad, seconds=elapsed)


def run(env):
    services, args = env.services, env.args
    paths = {DIRECT: None, "AnyProxy": services.socks["AnyProxy"]}
    runs = {(name, kind): [] for name in paths for kind in KINDS}
    for r in range(args.rounds):
        log("udp round %d/%d (%ds per run; ping-pong %d B; burst %d B, %d in flight)", r + 1, args.rounds,
            args.seconds, UDP_PING_SIZE, UDP_BURST_SIZE, args.udp_window)
        for name, proxy in paths.items():
            # A new association per path and round, used by both runs.
            try:
                path = retry("UDP echo via " + name, lambda: open_udp_path(services.ports["udp_echo"], proxy),
                             timeout=15)
            except BenchError as e:
                log("  %-24s failed: %s", name, e)
                for kind in KINDS:
                    runs[(name, kind)].append(None)
                continue
            with path:
                for kind in KINDS:
                    procs = list(env.rss.procs.values()) if proxy is not None else []
                    try:
                        before = cpu_seconds(*procs)
                        if kind == "pingpong":
                            result = udp_pingpong(path, args.seconds)
                        else:
                            result = udp_burst(path, args.seconds, args.udp_window)
                        if procs and result.sent:
                            spent = cpu_seconds(*procs) - before
                            result = attr.evolve(result, cpu_us=spent * 1e6 / result.sent)
                    except (OSError, BenchError) as e:
                        log("  %-24s %-9s failed: %s", name, kind, e)
                        result = None
                    else:
                        log("  %-24s %-9s %8.0f %s%s; lost %d of %d%s%s%s", name, kind, result.rate,
                            "round trips/s" if kind == "pingpong" else "datagrams/s",
                            " (%.0f Mbit/s)" % result.mbps if result.mbps is not None else "",
                            result.lost, result.sent,
                            ", %d late" % result.late if result.late else "",
                            ", %d bad" % result.bad if result.bad else "",
                            "; CPU %.1f µs/datagram" % result.cpu_us if result.cpu_us is not None else "")
                    runs[(name, kind)].append(result)
    return UdpResult(runs=runs, paths=list(paths), window=args.udp_window)


def _figures(window):
    """(kind, figure, table label) for the table's rows."""
    burst = "6 UDP burst %s B, %d in flight" % (num(UDP_BURST_SIZE), window)
    return (("pingpong", "rate", "6 UDP ping-pong %d B, round trips/s" % UDP_PING_SIZE),
            ("burst", "rate", burst + ", datagrams/s"),
            ("burst", "mbps", burst + ", Mbit/s"))


def rows(result):
    out = []
    for kind, key, label in _figures(result.window):
        ours = result.median("AnyProxy", kind, key)
        for name in result.paths:
            value = result.median(name, kind, key)
            loss = "" if key == "mbps" else "; " + result.loss_text(name, kind)
            if name == "AnyProxy":
                out.append(Row(label, "**AnyProxy** (SOCKS5 UDP ASSOCIATE → gateway → wss → client)" + loss,
                               num(value)))
            else:
                out.append(Row(label, name + loss, num(value), num(ratio(ours, value), "{:.2f}")))
    for kind, label in (("pingpong", "6 UDP ping-pong"), ("burst", "6 UDP burst")):
        cpu = median([x.cpu_us for x in result.runs[("AnyProxy", kind)] if x and x.cpu_us is not None])
        if cpu is not None:
            out.append(Row(label + ", CPU µs per datagram", "AnyProxy gateway + client (user + system)",
                           fmt(cpu, "%.1f")))
    return out


def raw(result):
    lines = ["UDP, per round: ping-pong round trips/s; burst datagrams/s and Mbit/s (lost / sent; "
             "lost: no answer within %g s; late: answers after that, if any):" % UDP_LOSS_TIMEOUT, ""]
    for name in result.paths:
        pingpong = ["failed" if x is None else "%.0f (%d / %d%s)%s" % (
            x.rate, x.lost, x.sent, ", %d late" % x.late if x.late else "", _cpu_text(x))
            for x in result.runs[(name, "pingpong")]]
        burst = ["failed" if x is None else "%.0f, %.0f Mbit/s (%d / %d%s)%s" % (
            x.rate, x.mbps, x.lost, x.sent, ", %d late" % x.late if x.late else "", _cpu_text(x))
            for x in result.runs[(name, "burst")]]
        lines.append("- %s: ping-pong %s; burst %s" % (name, ", ".join(pingpong), "; ".join(burst)))
    return lines


def _cpu_text(run):
    return "" if run.cpu_us is None else " CPU %.1f µs" % (run.cpu_us,)


def panels(result):
    out = []
    names = result.paths
    for kind, key, unit in (("pingpong", "rate", "round trips/s"), ("burst", "mbps", "Mbit/s")):
        values = [result.median(n, kind, key) for n in names]
        texts = []
        for n, v in zip(names, values):
            lost, sent = result.lost(n, kind)
            text = "%s %s" % (fmt(v), unit)
            if kind == "burst":
                text += "\n%s datagrams/s" % fmt(result.median(n, kind, "rate"))
            texts.append(text + "\nlost %s%%" % fmt(100 * lost / sent if sent else None, "%.2g"))
        r = ratio(values[names.index("AnyProxy")], values[names.index(DIRECT)])
        out.append(Panel(
            title="6. UDP echo, %s: AnyProxy %s× direct" % (
                "ping-pong %d B" % UDP_PING_SIZE if kind == "pingpong" else
                "burst %s B, %d in flight" % (num(UDP_BURST_SIZE), result.window), fmt(r, "%.2f")),
            ylabel="%s (median)" % unit,
            categories=names,
            series=[Series(label="", values=values, texts=texts,
                           colors=[ANYPROXY if n == "AnyProxy" else PEER for n in names])],
            margin=0.2))
    return out


def settings(args):
    return ("UDP %ds per run, %d B ping-pong, %d B burst with %d in flight, lost after %g s without an answer"
            % (args.seconds, UDP_PING_SIZE, UDP_BURST_SIZE, args.udp_window, UDP_LOSS_TIMEOUT))


EXAMPLE = UdpResult(
    runs={(DIRECT, "pingpong"): [UdpRun(rate=17426.3, sent=87132, lost=0, late=0, bad=0, seconds=5.0)],
          (DIRECT, "burst"): [UdpRun(rate=158303.0, mbps=1519.7, sent=791579, lost=3, late=1, bad=0, seconds=5.0)],
          ("AnyProxy", "pingpong"): [UdpRun(rate=3790.3, sent=18952, lost=0, late=0, bad=0, seconds=5.0,
                                            cpu_us=112.5)],
          ("AnyProxy", "burst"): [None]},
    paths=[DIRECT, "AnyProxy"], window=UDP_WINDOW)

MEASUREMENT = Measurement(
    name="udp", number=6, summary="a UDP echo directly and through SOCKS5 UDP ASSOCIATE: ping-pong and burst",
    result=UdpResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=[Option(flag="--udp-window", help="datagrams in flight in the UDP burst", default=UDP_WINDOW,
                    minimum=1)],
    needs=frozenset({"udp_echo"}))
