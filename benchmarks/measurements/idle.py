"""
3. idle: 10,000 SOCKS5 CONNECTs to the echo target through the one tunnel
(asyncio, 200 handshakes in flight), held open; then every stream sends a
line and must get it back.  RSS of gateway + client before, after opening,
after that use and after closing; KiB per stream = (after use - before) /
streams.
"""

import asyncio
import time
import typing

import attr

from harness import KiB, LOOPBACK, MiB, BenchError, log
from harness.chart import Panel, Series
from harness.clients import socks_open
from harness.measurement import Measurement, Option
from harness.memory import Sample
from harness.processes import nofile_limit
from harness.report import Row, check, num, yes_no

TARGET_KIB_PER_STREAM = 32
LABEL = "3 idle streams"
STAGES = (("before", "before"), ("after_open", "after open"), ("after_use", "after use"),
          ("after_close", "after close"))


@attr.s(frozen=True, auto_attribs=True)
class IdleResult:
    count: int                 # streams asked for
    opened: int
    usable: int                # streams whose echo came back
    errors: typing.List[str]   # the first open failures
    error_count: int
    open_seconds: float
    before: Sample
    after_open: Sample
    after_use: Sample
    after_close: Sample

    @property
    def kib_per_stream(self):
        return (self.after_use.total - self.before.total) / self.count / KiB


async def _open_many(proxy_port, echo_port, count, parallel=200):
    sem = asyncio.Semaphore(parallel)
    errors = []

    async def one():
        async with sem:
            try:
                return await asyncio.wait_for(socks_open(proxy_port, LOOPBACK, echo_port), 60)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BenchError) as e:
                errors.append(repr(e))
                return None

    streams = await asyncio.gather(*(one() for _ in range(count)))
    return [s for s in streams if s is not None], errors


async def _check_all(streams, parallel=1000):
    sem = asyncio.Semaphore(parallel)

    async def one(i, stream):
        reader, writer = stream
        message = b"stream %d\n" % i
        async with sem:
            try:
                writer.write(message)
                return await asyncio.wait_for(reader.readexactly(len(message)), 60) == message
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return False

    return sum(await asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))


async def _close_all(streams):
    for _, writer in streams:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in streams), return_exceptions=True)


def run(env):
    rss, count = env.rss, env.args.streams
    limit = nofile_limit()
    if limit < count + 1000:
        log("RLIMIT_NOFILE is %d: lowering --streams from %d to %d", limit, count, limit - 1000)
        count = limit - 1000

    async def go():
        before = rss.settle()
        log("idle: opening %d streams through one tunnel", count)
        t0 = time.time()
        streams, errors = await _open_many(env.services.socks["AnyProxy"], env.services.ports["echo"], count)
        open_seconds = time.time() - t0
        log("idle: %d open in %.1fs (%d failed%s)", len(streams), open_seconds, len(errors),
            ": " + errors[0] if errors else "")
        await asyncio.sleep(1)
        opened = rss.settle()
        log("idle: checking every stream with an echo")
        usable = await _check_all(streams)
        await asyncio.sleep(1)
        used = rss.settle()
        log("idle: %d/%d usable", usable, count)
        await _close_all(streams)
        await asyncio.sleep(2)
        closed = rss.settle()
        return IdleResult(count=count, opened=len(streams), usable=usable, errors=errors[:5],
                          error_count=len(errors), open_seconds=open_seconds,
                          before=before, after_open=opened, after_use=used, after_close=closed)
    return asyncio.run(go())


def rows(result):
    out = [Row(LABEL, "%d streams opened / usable" % result.count, "%d / %d" % (result.opened, result.usable),
               "", "all usable", yes_no(result.usable == result.count))]
    for side in ("gateway", "client"):
        out.append(Row(LABEL, "%s RSS before → after, MiB" % side,
                       "%.1f → %.1f" % (result.before.rss(side) / MiB, result.after_use.rss(side) / MiB)))
    per = result.kib_per_stream
    out.append(Row(LABEL, "KiB per stream (gateway + client)", num(per, "{:.1f}"), "",
                   "≤ %d" % TARGET_KIB_PER_STREAM, check(per, TARGET_KIB_PER_STREAM, higher=False)))
    return out


def raw(result):
    closed = result.after_close
    return ["Idle streams: opened in %.1fs; %d open failures%s; RSS after closing them: gateway "
            "%.1f MiB, client %.1f MiB (fds %d / %d)." % (
                result.open_seconds, result.error_count,
                " (first: %s)" % result.errors[0] if result.errors else "",
                closed.gateway / MiB, closed.client / MiB, closed.gateway_fds, closed.client_fds)]


def panels(result):
    return [Panel(
        title="3. %d idle streams: %.1f KiB/stream (target ≤ %d)" % (result.count, result.kib_per_stream,
                                                                    TARGET_KIB_PER_STREAM),
        ylabel="RSS, MiB",
        categories=[label for _, label in STAGES],
        series=[Series(label=side, values=[getattr(result, key).rss(side) / MiB for key, _ in STAGES])
                for side in ("gateway", "client")],
        fontsize=7)]


def settings(args):
    return "%d idle streams" % args.streams


def _sample(gateway_mib, client_mib, fds):
    gateway, client = int(gateway_mib * MiB), int(client_mib * MiB)
    return Sample(gateway=gateway, gateway_fds=fds + 4, client=client, client_fds=fds + 5, total=gateway + client)


EXAMPLE = IdleResult(count=10000, opened=10000, usable=9999, errors=["TimeoutError()"], error_count=1,
                     open_seconds=6.7, before=_sample(80.3, 67.4, 10), after_open=_sample(130.9, 107.2, 10010),
                     after_use=_sample(131.5, 108.0, 10010), after_close=_sample(131.6, 108.4, 10))

MEASUREMENT = Measurement(
    name="idle", number=3, summary="10,000 idle SOCKS5 streams through one tunnel: KiB per stream",
    result=IdleResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=[Option(flag="--streams", help="idle streams", default=10000, quick=1000, minimum=1)],
    open_streams=lambda args: args.streams)
