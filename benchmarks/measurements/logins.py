"""
12. logins: SOCKS5 logins per second (greeting, RFC 1929 username/password,
the answer; then the connection closes) through a gateway of its own
(``twistd anyproxy-gateway``, no client: a login needs no tunnel), for each
way a password may be configured (``gateway.users``):

  - plain: a plain-text password, compared in constant time;
  - argon2id, first login: an ``anyproxy-passwd`` hash (argon2-cffi's
    defaults, RFC 9106's second recommendation: 64 MiB, t=3, p=4), a
    (user, password) pair the gateway has not seen, so the hash is checked
    in its password thread pool (two threads);
  - argon2id, cached: the same pairs again, within the minute the gateway
    remembers a pair checked good (one HMAC);
  - bcrypt (cost 12), first login and cached, likewise.

Every entry of a scheme shares one hash (one password), but the cache is
keyed by the user name too, so each user's first login is a real hash check;
each round takes new users.  ``--concurrency`` connections log in at once
(a first-login run: ``FIRST_LOGIN_CONCURRENCY``, twice the gateway's hash
threads: more would only queue, and a login queued past the SOCKS5
handshake deadline, 10 s, is cut off, which measures the deadline instead),
``--logins`` logins per plain and per cached run (a first-login run is one
login per user: ``--logins``/50 users, at least 20).  Rounds interleave the
paths, the order flipped each round.  The reference ("peer") is the plain
login: the ratio is each path / plain.  No target for the first logins (they
are bounded by the hash's cost and the two threads, on purpose); the cached
ones should be within reach of plain (target: at least 0.5 of plain).
"""

import asyncio
import os
import time
import typing

import attr
import yaml

from harness import LOOPBACK, BenchError, log
from harness.chart import ANYPROXY, PEER, Panel, Series
from harness.measurement import Measurement, Option
from harness.processes import free_port, wait_port
from harness.report import Row, check, median, num, ratio

LABEL = "12 logins: SOCKS5 logins per s"
PLAIN = "plain"
ARGON_FIRST = "argon2id, first login"
ARGON_CACHED = "argon2id, cached"
BCRYPT_FIRST = "bcrypt, first login"
BCRYPT_CACHED = "bcrypt, cached"
PATHS = (PLAIN, ARGON_FIRST, ARGON_CACHED, BCRYPT_FIRST, BCRYPT_CACHED)
CACHED = (ARGON_CACHED, BCRYPT_CACHED)
TARGET_CACHED_SHARE = 0.5  # a remembered login at least half as fast as a plain one
FIRST_LOGIN_CONCURRENCY = 4  # anyproxy.passwords.PasswordChecker's two threads, kept busy
PASSWORD = {"plain": "bench-plain-pw", "argon2id": "bench-argon-pw", "bcrypt": "bench-bcrypt-pw"}


@attr.s(frozen=True, auto_attribs=True)
class LoginRun:
    rate: float    # logins per second
    logins: int    # logins made
    failed: int    # logins refused or broken (there should be none)


@attr.s(frozen=True, auto_attribs=True)
class LoginsResult:
    runs: typing.Dict[str, typing.List[LoginRun]]  # path -> one run per round
    concurrency: int

    def rate(self, path):
        return median([x.rate for x in self.runs[path]])

    def failed(self, path):
        return sum(x.failed for x in self.runs[path])

    def share(self, path):
        """The path's rate over plain's, the median of the per-round ratios."""
        return median([ratio(run.rate, plain.rate)
                       for run, plain in zip(self.runs[path], self.runs[PLAIN])])


def _users(rounds, per_round):
    """C{{scheme: [[user names of round r]]}}: fresh users for each round's first logins."""
    return {scheme: [["%s-%d-%d" % (scheme, r, n) for n in range(per_round)]
                     for r in range(rounds)]
            for scheme in ("argon2id", "bcrypt")}


def _gateway_config(env, socks_port, tunnel_port, users):
    from anyproxy.passwords import hash_password  # the venv runs the tree's code
    certs = env.processes.path("certs")
    hashes = {scheme: hash_password(PASSWORD[scheme], scheme) for scheme in ("argon2id", "bcrypt")}
    entries = [{"username": "plain-user", "password": PASSWORD["plain"]}]
    for scheme, rounds in users.items():
        entries.extend({"username": name, "password": hashes[scheme]}
                       for names in rounds for name in names)
    return {
        "log": {"level": env.args.anyproxy_log_level},
        "proxy": {"socks5": {"listen_addr": "%s:%d" % (LOOPBACK, socks_port), "users": "all"}},
        "gateway": {"listen_addr": "%s:%d" % (LOOPBACK, tunnel_port),
                    "tls_cert": os.path.join(certs, "server.crt"),
                    "tls_key": os.path.join(certs, "server.key"),
                    "auth_username": "bench", "auth_password": "bench-password",
                    "users": entries,
                    "auth_throttle": {"failures": 0}},  # the bench logs in fast from one address
    }


async def _login(port, username, password):
    """One SOCKS5 login; whether it was accepted."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        user, secret = username.encode(), password.encode()
        writer.write(b"\x05\x01\x02\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret)
        answer = await reader.readexactly(4)
        return answer == b"\x05\x02\x01\x00"
    finally:
        writer.close()


async def _logins(port, logins, concurrency):
    """Run C{logins} (C{(user, password)} pairs), C{concurrency} at once: C{LoginRun}."""
    pending = iter(logins)
    counts = {"ok": 0, "failed": 0}

    async def worker():
        for username, password in pending:
            try:
                ok = await _login(port, username, password)
            except (OSError, asyncio.IncompleteReadError):
                ok = False
            counts["ok" if ok else "failed"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    total = counts["ok"] + counts["failed"]
    return LoginRun(rate=counts["ok"] / elapsed, logins=total, failed=counts["failed"])


def login_rate(port, logins, concurrency):
    return asyncio.run(_logins(port, logins, concurrency))


def run(env):
    args, processes, services = env.args, env.processes, env.services
    per_round = max(20, args.logins // 50)
    users = _users(args.rounds, per_round)
    socks_port, tunnel_port = free_port(), free_port()
    path = processes.path("logins-gateway.yaml")
    log("logins: hashing the benchmark's passwords (argon2id defaults, bcrypt cost 12)")
    with open(path, "w") as f:
        yaml.safe_dump(_gateway_config(env, socks_port, tunnel_port, users), f)
    services.twistd("logins-gateway", "anyproxy-gateway", "--config=" + path)
    wait_port(socks_port, timeout=30, processes=processes, names=("logins-gateway",))

    def pairs(scheme, r, times=1):
        return [(name, PASSWORD[scheme]) for name in users[scheme][r]] * times

    runs = {p: [] for p in PATHS}
    repeat = max(1, args.logins // per_round)
    for r in range(args.rounds):
        log("logins round %d/%d (%d logins per run, %d users per first-login run, %d at once)",
            r + 1, args.rounds, args.logins, per_round, args.concurrency)
        plan = {
            PLAIN: [("plain-user", PASSWORD["plain"])] * args.logins,
            ARGON_FIRST: pairs("argon2id", r),
            ARGON_CACHED: pairs("argon2id", r, repeat),
            BCRYPT_FIRST: pairs("bcrypt", r),
            BCRYPT_CACHED: pairs("bcrypt", r, repeat),
        }
        # A cached run must follow its first-login run (it needs the pairs
        # remembered); the schemes and plain swap places each round.
        order = [PLAIN, ARGON_FIRST, ARGON_CACHED, BCRYPT_FIRST, BCRYPT_CACHED]
        if r % 2:
            order = [BCRYPT_FIRST, BCRYPT_CACHED, ARGON_FIRST, ARGON_CACHED, PLAIN]
        for each in order:
            concurrency = (FIRST_LOGIN_CONCURRENCY if each in (ARGON_FIRST, BCRYPT_FIRST)
                           else args.concurrency)
            result = login_rate(socks_port, plan[each], concurrency)
            runs[each].append(result)
            log("  %-22s %8.0f logins/s (%d logins, %d failed)", each, result.rate,
                result.logins, result.failed)
        processes.check_alive("logins-gateway")
    processes.stop("logins-gateway")
    if any(run.failed for runs_of in runs.values() for run in runs_of):
        raise BenchError("logins: some logins were refused (see logins-gateway.log)")
    return LoginsResult(runs=runs, concurrency=args.concurrency)


def rows(result):
    out = []
    for path in PATHS:
        share = result.share(path) if path != PLAIN else None
        target = "≥ %.1f of plain" % TARGET_CACHED_SHARE if path in CACHED else ""
        met = check(share, TARGET_CACHED_SHARE) if path in CACHED else ""
        out.append(Row(LABEL, "%s (failed: %d)" % (path, result.failed(path)),
                       num(result.rate(path)), num(share, "{:.3f}") if share is not None else "",
                       target, met))
    return out


def raw(result):
    return ["Logins per second, per round (%d at once, first logins %d; the ratio column is "
            "each path / plain):" % (result.concurrency, FIRST_LOGIN_CONCURRENCY), ""] + [
        "- %s: %s" % (path, ", ".join("%.0f" % run.rate for run in runs))
        for path, runs in result.runs.items()] + [""]


def panels(result):
    return [Panel(
        title="12. SOCKS5 logins per second, by how the password is stored",
        ylabel="logins/s (median)",
        categories=list(PATHS),
        series=[Series(label="", values=[result.rate(p) for p in PATHS],
                       texts=["%.0f" % (result.rate(p) or 0) for p in PATHS],
                       colors=[PEER if p == PLAIN else ANYPROXY for p in PATHS])],
        margin=0.15)]


def settings(args):
    return "logins: %d per run, %d users per first-login run, %d at once (first logins: %d)" % (
        args.logins, max(20, args.logins // 50), args.concurrency, FIRST_LOGIN_CONCURRENCY)


EXAMPLE = LoginsResult(
    runs={PLAIN: [LoginRun(rate=3000.0, logins=2000, failed=0)],
          ARGON_FIRST: [LoginRun(rate=25.0, logins=200, failed=0)],
          ARGON_CACHED: [LoginRun(rate=2800.0, logins=2000, failed=0)],
          BCRYPT_FIRST: [LoginRun(rate=12.0, logins=200, failed=0)],
          BCRYPT_CACHED: [LoginRun(rate=2800.0, logins=2000, failed=0)]},
    concurrency=20)

MEASUREMENT = Measurement(
    name="logins", number=12,
    summary="SOCKS5 logins per second: plain, argon2id and bcrypt hashes (first login, cached)",
    result=LoginsResult, run=run, rows=rows, raw=raw, panels=panels, settings=settings,
    example=EXAMPLE, tools=("python:argon2", "python:bcrypt"),
    options=[Option(flag="--logins", help="logins per plain or cached run", default=2000,
                    quick=400, minimum=200)])
