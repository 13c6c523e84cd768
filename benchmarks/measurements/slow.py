"""
4. slow: ``--slow-readers`` users (receive buffer 64 KiB each) download from
the endless source through AnyProxy, read 4 MiB each, then stop reading.
Once RSS settles: the RSS growth of gateway and client per stalled user
(several at once, so the figure depends less on the allocator reusing memory
it already holds), against one flow-control window.  Then an iperf3
download on the same tunnel, vs the same download alone (before each round
and once more after the last).  Finally every stalled user reads again and
must get 4 MiB more.
"""

import contextlib
import time
import typing

import attr

from harness import KiB, LOOPBACK, MiB, BenchError, log
from harness.chart import Panel, Series
from harness.clients import socks_connect
from harness.measurement import Measurement, Option
from harness.memory import PeakSampler, Sample
from harness.report import Row, check, fmt, median, num, ratio, yes_no

TARGET_OTHER_STREAM = 0.9   # the other stream keeps this share of its solo speed
WINDOWS_PER_USER = 1.5      # what a stalled user may cost each side, in windows
LABEL = "4 slow reader"
SIDES = ("gateway", "client")


@attr.s(frozen=True, auto_attribs=True)
class SlowRound:
    solo: typing.Optional[float]       # Mbit/s of the other download alone, before the stall
    meanwhile: typing.Optional[float]  # ... while the users are stalled
    before: Sample
    stalled: Sample                    # settled once the users stopped reading
    after: Sample
    peak: Sample                       # highest RSS while the other stream ran as well
    users: int
    resumed: int                       # stalled users that got 4 MiB more afterwards
    # What a stalled user costs: settled RSS once they are stuck, before the
    # other stream starts (whose own buffers would count otherwise), per user;
    # "peak": the highest RSS while the other stream ran too (informative).
    gateway_growth: float
    gateway_peak_growth: float
    client_growth: float
    client_peak_growth: float

    def growth(self, side):
        return getattr(self, side + "_growth")

    def peak_growth(self, side):
        return getattr(self, side + "_peak_growth")


@attr.s(frozen=True, auto_attribs=True)
class SlowResult:
    rounds: typing.List[SlowRound]
    window: int                          # DEFAULT_WINDOW, bytes
    extra_solo: typing.Optional[float]   # a last solo run, so every stalled run has one on each side
    users: int

    def largest_growth(self, side):
        return max(r.growth(side) for r in self.rounds)

    @property
    def solo(self):
        return median([r.solo for r in self.rounds] + [self.extra_solo])

    @property
    def meanwhile(self):
        return median([r.meanwhile for r in self.rounds])


def _read(sock, count):
    got = 0
    with contextlib.suppress(OSError):
        while got < count:
            chunk = sock.recv(256 * KiB)
            if not chunk:
                break
            got += len(chunk)
    return got


def run(env):
    services, args, rss = env.services, env.args, env.rss
    socks = services.socks["AnyProxy"]
    conf = services.write_proxychains("AnyProxy", socks)
    users = args.slow_readers
    rounds = []
    for r in range(args.rounds):
        log("slow reader round %d/%d (%d users stop reading)", r + 1, args.rounds, users)
        solo = services.iperf(conf, args.seconds, True, args.omit)
        before = rss.settle()
        readers = []
        try:
            for _ in range(users):
                reader = socks_connect(socks, LOOPBACK, services.ports["source"], rcvbuf=64 * KiB)
                readers.append(reader)
                if _read(reader, 4 * MiB) < 4 * MiB:  # it flows ...
                    raise BenchError("the slow reader's download did not start")
            # ... and now these users stop reading.
            with PeakSampler(rss) as sampler:
                stalled = rss.settle(quiet=64 * KiB, limit=10)
                meanwhile = services.iperf(conf, args.seconds, True, args.omit)
            after = rss.sample()
            # The stalled streams must still work once they read again.
            for reader in readers:
                reader.settimeout(10)
            resumed = sum(_read(reader, 4 * MiB) >= 4 * MiB for reader in readers)
        finally:
            for reader in readers:
                reader.close()
        peak = sampler.peak
        row = SlowRound(solo=solo, meanwhile=meanwhile, before=before, stalled=stalled, after=after, peak=peak,
                        users=users, resumed=resumed,
                        **{side + "_growth": (stalled.rss(side) - before.rss(side)) / users for side in SIDES},
                        **{side + "_peak_growth": (peak.rss(side) - before.rss(side)) / users for side in SIDES})
        log("  solo %s, meanwhile %s Mbit/s; per stalled user: gateway %.2f MiB, client %.2f MiB "
            "(peak with the other stream %.2f / %.2f); %d/%d read again",
            fmt(solo), fmt(meanwhile), row.gateway_growth / MiB, row.client_growth / MiB,
            row.gateway_peak_growth / MiB, row.client_peak_growth / MiB, resumed, users)
        rounds.append(row)
        time.sleep(1)
    extra_solo = services.iperf(conf, args.seconds, True, args.omit)
    log("  solo %s", fmt(extra_solo))
    return SlowResult(rounds=rounds, window=env.window, extra_solo=extra_solo, users=users)


def rows(result):
    limit = WINDOWS_PER_USER * result.window
    out = []
    for side in SIDES:
        g = result.largest_growth(side)
        out.append(Row(LABEL, "%s RSS growth per stalled user (largest of the rounds), MiB" % side,
                       num(g / MiB, "{:.2f}"), "",
                       "≈ 1 window (%.2g MiB), ≤ %.3g" % (result.window / MiB, limit / MiB),
                       check(g, limit, higher=False)))
    out.append(Row(LABEL, "other stream download, solo, Mbit/s", num(result.solo)))
    r = ratio(result.meanwhile, result.solo)
    out.append(Row(LABEL, "other stream with %d users stalled, Mbit/s (ratio: / solo)" % result.users,
                   num(result.meanwhile), num(r, "{:.2f}"), "≥ %.2g" % TARGET_OTHER_STREAM,
                   check(r, TARGET_OTHER_STREAM)))
    resumed, stalled = sum(r.resumed for r in result.rounds), sum(r.users for r in result.rounds)
    out.append(Row(LABEL, "stalled streams that read again afterwards", "%d / %d" % (resumed, stalled), "",
                   "all", yes_no(resumed == stalled)))
    return out


def raw(result):
    return (["Slow reader, per round: solo / meanwhile Mbit/s; RSS growth per stalled user, gateway / "
             "client MiB, once stalled (and at the peak while the other stream also ran):", ""]
            + ["- %s / %s; %.2f / %.2f (%.2f / %.2f)" % (
                fmt(r.solo), fmt(r.meanwhile), r.gateway_growth / MiB, r.client_growth / MiB,
                r.gateway_peak_growth / MiB, r.client_peak_growth / MiB) for r in result.rounds]
            + ["- closing solo run: %s" % fmt(result.extra_solo)])


def panels(result):
    return [Panel(
        title="4. slow reader: RSS growth per stalled user (%d at once)\nother stream meanwhile: %.0f%% of solo"
              % (result.users, 100 * (ratio(result.meanwhile, result.solo) or 0)),
        ylabel="RSS change, MiB",
        categories=["round %d" % (i + 1) for i in range(len(result.rounds))],
        series=[Series(label=side, values=[r.growth(side) / MiB for r in result.rounds]) for side in SIDES],
        fmt="%.2f",
        reference=(result.window / MiB, "one window"))]


def settings(args):
    return "%d slow readers" % args.slow_readers


def _example_round(solo, meanwhile, gateway_growth):
    before = Sample(gateway=72 * MiB, gateway_fds=14, client=67 * MiB, client_fds=9, total=139 * MiB)
    stalled = attr.evolve(before, gateway=before.gateway + 4 * gateway_growth,
                          total=before.total + 4 * gateway_growth)
    return SlowRound(solo=solo, meanwhile=meanwhile, before=before, stalled=stalled, after=stalled, peak=stalled,
                     users=4, resumed=4, gateway_growth=gateway_growth, gateway_peak_growth=gateway_growth,
                     client_growth=0.0, client_peak_growth=0.0)


EXAMPLE = SlowResult(rounds=[_example_round(6678.0, 7048.0, 984064.0), _example_round(7235.0, None, 265216.0)],
                     window=MiB, extra_solo=6982.0, users=4)

MEASUREMENT = Measurement(
    name="slow", number=4, summary="users stop reading a download: RSS per stalled user, another stream's speed",
    result=SlowResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=[Option(flag="--slow-readers", help="users that stall a download at once in the slow measurement",
                    default=4, minimum=1)],
    needs=frozenset({"iperf3"}), tools=("proxychains4",))
