"""
5. churn: batches of short streams (SOCKS5 CONNECT, one echo, close; 50 at a
time), then RSS and open descriptors of gateway and client after each batch.
The first batch warms the allocator up; the last should leave RSS where it
was and the descriptors where they started.
"""

import asyncio
import contextlib
import time
import typing

import attr

from harness import LOOPBACK, MiB, BenchError, log
from harness.chart import Panel, Series
from harness.clients import socks_open
from harness.measurement import Measurement, Option
from harness.memory import Sample
from harness.report import Row, check, num, yes_no

# "Flat": what the last batch may add to gateway + client RSS.
CHURN_SLACK = 2 * MiB
LABEL = "5 churn"
SIDES = ("gateway", "client")


@attr.s(frozen=True, auto_attribs=True)
class ChurnResult:
    per_batch: int
    samples: typing.List[Sample]  # before the first batch, then after each
    failures: int
    errors: typing.List[str]      # the first failures
    rates: typing.List[float]     # streams/s per batch

    @property
    def batches(self):
        return len(self.samples) - 1

    @property
    def last_change(self):
        """Gateway + client RSS change over the last batch (over all, with one batch), bytes."""
        s = self.samples
        return s[-1].total - (s[-2] if len(s) > 2 else s[0]).total


async def _churn(proxy_port, echo_port, count, parallel=50):
    sem = asyncio.Semaphore(parallel)
    failures = []

    async def one(i):
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(socks_open(proxy_port, LOOPBACK, echo_port), 30)
                try:
                    message = b"churn %d\n" % i
                    writer.write(message)
                    if await asyncio.wait_for(reader.readexactly(len(message)), 30) != message:
                        failures.append("bad echo")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BenchError) as e:
                failures.append(repr(e))

    await asyncio.gather(*(one(i) for i in range(count)))
    return failures


def run(env):
    args, rss = env.args, env.rss
    samples = [rss.settle()]
    failures = 0
    first_errors = []
    rates = []
    for b in range(args.churn_batches):
        t0 = time.time()
        errors = asyncio.run(_churn(env.services.socks["AnyProxy"], env.services.ports["echo"], args.churn))
        rates.append(args.churn / (time.time() - t0))
        failures += len(errors)
        first_errors += errors[:3]
        time.sleep(1)
        samples.append(rss.settle())
        log("churn batch %d/%d: %d streams, %.0f/s, %d failed; RSS gateway %.1f MiB, client %.1f MiB, "
            "fds %d/%d", b + 1, args.churn_batches, args.churn, rates[-1], len(errors),
            samples[-1].gateway / MiB, samples[-1].client / MiB,
            samples[-1].gateway_fds, samples[-1].client_fds)
    return ChurnResult(per_batch=args.churn, samples=samples, failures=failures, errors=first_errors[:5],
                       rates=rates)


def rows(result):
    s = result.samples
    out = [Row(LABEL, "%d short streams in %d batches, failed" % (result.per_batch * result.batches, result.batches),
               str(result.failures), "", "0", yes_no(result.failures == 0))]
    for side in SIDES:
        out.append(Row(LABEL, "%s RSS per batch, MiB" % side, " → ".join("%.1f" % (x.rss(side) / MiB) for x in s)))
        out.append(Row(LABEL, "%s open fds per batch" % side, " → ".join(str(x.fds(side)) for x in s), "",
                       "back to start", yes_no(s[-1].fds(side) <= s[0].fds(side) + 2)))
    out.append(Row(LABEL, "gateway + client RSS change over the last batch, MiB",
                   num(result.last_change / MiB, "{:+.2f}"), "", "flat (≤ %+.0f)" % (CHURN_SLACK / MiB),
                   check(result.last_change, CHURN_SLACK, higher=False)))
    return out


def raw(result):
    return ["Churn: %s streams/s per batch%s." % (
        ", ".join("%.0f" % x for x in result.rates),
        "; first errors: %s" % "; ".join(result.errors) if result.errors else "")]


def panels(result):
    return [Panel(
        title="5. churn: %d short streams in %d batches\nRSS change over the last batch: %+.2f MiB"
              % (result.per_batch * result.batches, result.batches, result.last_change / MiB),
        ylabel="RSS after each batch, MiB",
        categories=["start"] + ["batch %d" % (i + 1) for i in range(result.batches)],
        series=[Series(label=side, values=[x.rss(side) / MiB for x in result.samples]) for side in SIDES],
        fmt="%.1f", fontsize=7)]


def settings(args):
    return "churn %d × %d streams" % (args.churn_batches, args.churn)


def _sample(gateway_mib, client_mib, fds):
    gateway, client = int(gateway_mib * MiB), int(client_mib * MiB)
    return Sample(gateway=gateway, gateway_fds=fds, client=client, client_fds=fds + 1, total=gateway + client)


EXAMPLE = ChurnResult(per_batch=3000, samples=[_sample(80.0, 66.9, 14), _sample(80.3, 67.3, 14),
                                               _sample(80.3, 67.4, 15), _sample(80.3, 67.4, 17)],
                      failures=1, errors=["IncompleteReadError(0 bytes read)"], rates=[1462.1, 1929.3, 1693.4])

MEASUREMENT = Measurement(
    name="churn", number=5, summary="short streams opened and closed in batches: RSS and descriptors after each",
    result=ChurnResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings, example=EXAMPLE,
    options=[Option(flag="--churn", help="streams per churn batch", default=3000, quick=500, minimum=1),
             Option(flag="--churn-batches", help="churn batches", default=3, quick=2, minimum=1)])
