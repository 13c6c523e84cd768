# -*- test-case-name: tests.test_fleet_registry -*-
"""
The fleet registry in Redis (L{RedisFleetRegistry}, an
L{anyproxy.fleet.interfaces.IFleetRegistry}), through txredisapi.

Keys (prefix C{anyproxy:}), all written by Lua scripts so that each
heartbeat is one round trip and every expiry is in Redis's own clock (the
nodes' clocks may disagree):

  - C{anyproxy:node:NODE}: the node's L{NodeRecord} as JSON, C{PX} three
    heartbeats, rewritten every heartbeat.
  - C{anyproxy:nodes}: sorted set, node id -> expiry (ms, Redis time);
    readers ignore (and trim) expired members.
  - C{anyproxy:group:GROUP}: sorted set, node id -> expiry, for the groups a
    node holds (an index for operators; nodes read the records).
  - C{anyproxy:port:PORT}: a forwarded port's claim, C{NODE/CLIENT}, taken
    with C{SET NX PX} and refreshed with the heartbeat.
  - channel C{anyproxy:events}: each write that changes a record publishes
    the node id; every node subscribes and re-reads the view at once.

Two connections per node: one for commands, one subscribed to the channel.
Each is a Twisted C{ClientService} (reconnecting with a backoff) whose
protocol is txredisapi's, so the password, the database and TLS
(C{rediss://}, through C{wrapClientTLS}) apply to both.

Readers use the cached view only.  Redis unreachable: C{healthy} turns
C{False}, the last view serves for C{keep_peers} seconds and then empties;
one log line marks each change of state, and the services reconnect by
themselves.  While healthy, a record is dropped locally at its expiry even
between reads, so a killed node leaves within three heartbeats.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket

import attr
import txredisapi
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from anyproxy.addresses import dial_address, host_port
from anyproxy.config.redis_url import parse_redis_url
from anyproxy.fleet.interfaces import IFleetRegistry, NodeRecord

log = Logger()

PREFIX = "anyproxy:"
# Seconds a node's record lives without a refresh, in heartbeats.
EXPIRY_BEATS = 3
# Group logins: PBKDF2-HMAC-SHA256 with this many iterations (the verifiers
# live in the fleet's own Redis; this makes a leaked one costly to invert
# while a check stays cheap enough for the reactor thread), and a cache of
# derived keys so that a login storm costs one derivation per password.
LOGIN_ITERATIONS = 20_000
LOGIN_MAX_ITERATIONS = 1_000_000  # a record asking for more is ignored
LOGIN_CACHE_SIZE = 1024
LOGIN_CACHE_SECONDS = 60.0
_VERIFIER_SCHEME = "pbkdf2_sha256"
# The longest node record read from Redis (ours are a few hundred bytes,
# plus about 90 per group login verifier).
MAX_RECORD = 1024 * 1024


class RegistryUnavailable(txredisapi.ConnectionError):
    """Redis cannot be reached now (the registry retries by itself)."""


# -- the Redis URL: anyproxy.config.redis_url ----------------------------------


def redis_endpoint(reactor, target, timeout):
    """The client endpoint to C{target}: TCP, in TLS for C{rediss://}."""
    endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    if not target.tls:
        return endpoint
    if target.ca_certs:
        with open(target.ca_certs, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    else:
        trust = platformTrust()
    client_cert = None
    if target.certfile:
        with open(target.certfile, "rb") as f:
            cert_pem = f.read()
        with open(target.keyfile, "rb") as f:
            key_pem = f.read()
        client_cert = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    options = optionsForClientTLS(target.host, trustRoot=trust, clientCertificate=client_cert)
    return wrapClientTLS(options, endpoint)


# -- defaults for the node's names ---------------------------------------------

def _dialable_host(host):
    """A wildcard listening host is no address to dial: use the host name."""
    if host in ("", "0.0.0.0", "::", "*"):
        return socket.gethostname()
    return host


def default_node_id(tunnel_port):
    """
    C{gateway.fleet.node_id} when empty: the host name and the tunnel port;
    with a tunnel port not yet known (0: any), a random suffix instead, so
    that two such nodes on one host never share an id.
    """
    if not tunnel_port:
        return "%s:%s" % (socket.gethostname(), secrets.token_hex(4))
    return "%s:%d" % (socket.gethostname(), tunnel_port)


def peer_dial_addr(peer_addr):
    """C{peer_addr} (C{host:port} it listens on) as other nodes dial it."""
    host, port = dial_address(peer_addr) if not peer_addr.startswith(":") else ("", peer_addr[1:])
    return host_port(_dialable_host(host), int(port))


def default_advertise_addr(peer_addr, tunnel_port):
    """
    C{gateway.fleet.advertise_addr} when empty: the tunnel port on the host
    of C{peer_addr} (the host name when that listens on every interface).
    """
    host = peer_dial_addr(peer_addr).rpartition(":")[0]
    return "%s:%d" % (host, tunnel_port)


# -- group login verifiers -----------------------------------------------------

def _b64(data):
    return base64.b64encode(data).decode("ascii")


def make_login_verifier(password, salt, iterations=LOGIN_ITERATIONS):
    """
    C{pbkdf2_sha256$ITERATIONS$SALT$KEY} (base64): what a node publishes for
    a group password, never the password itself.
    """
    key = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "%s$%d$%s$%s" % (_VERIFIER_SCHEME, iterations, _b64(salt), _b64(key))


def _parse_verifier(text):
    """C{(iterations, salt, key)}, or C{None} for a malformed verifier."""
    try:
        scheme, iterations, salt, key = text.split("$")
        iterations = int(iterations)
        if scheme != _VERIFIER_SCHEME or not 0 < iterations <= LOGIN_MAX_ITERATIONS:
            return None
        return iterations, base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except (AttributeError, ValueError):
        return None


class LoginChecker:
    """
    Checks group passwords against published verifiers, caching each
    derived key (per password, salt and iteration count) for a short while
    under a keyed digest of the password, so that repeated logins cost one
    derivation and the cache holds no password.
    """

    def __init__(self, clock, size=LOGIN_CACHE_SIZE, lifetime=LOGIN_CACHE_SECONDS):
        self._clock = clock
        self._size = size
        self._lifetime = lifetime
        self._key = os.urandom(32)
        self._cache = {}  # keyed digest -> (expires, derived key)

    def _derived(self, password, salt, iterations):
        now = self._clock.seconds()
        cache_key = hmac.new(self._key, b"%d\0%s\0%s" % (iterations, salt, password),
                             hashlib.sha256).digest()
        entry = self._cache.get(cache_key)
        if entry is not None and entry[0] > now:
            return entry[1]
        derived = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        if len(self._cache) >= self._size:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= self._size:  # all fresh: forget the oldest
                del self._cache[next(iter(self._cache))]
        self._cache[cache_key] = (now + self._lifetime, derived)
        return derived

    def check(self, verifiers, password):
        """Whether C{password} matches any of C{verifiers}, compared in constant time."""
        password = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        ok = False
        for text in verifiers:
            parsed = _parse_verifier(text)
            if parsed is None:
                continue
            iterations, salt, key = parsed
            ok |= hmac.compare_digest(self._derived(password, salt, iterations), key)
        return ok


# -- records ----------------------------------------------------------------------

def record_to_json(record):
    return json.dumps({
        "node_id": record.node_id, "peer_addr": record.peer_addr,
        "tunnel_addr": record.tunnel_addr, "groups": list(record.groups),
        "streams": record.streams, "tunnels": record.tunnels, "draining": record.draining,
        "logins": {group: list(verifiers) for group, verifiers in record.logins.items()},
    }, separators=(",", ":"), sort_keys=True)


def record_from_json(text):
    """A L{NodeRecord}, or raise ValueError for what no node of ours writes."""
    if len(text) > MAX_RECORD:
        raise ValueError("a record of %d bytes, over %d" % (len(text), MAX_RECORD))
    try:
        data = json.loads(text)
    except RecursionError:
        # "[[[[...": json raises this, not ValueError, past Python's recursion limit.
        raise ValueError("nested too deep") from None
    if not isinstance(data, dict):
        raise ValueError("not an object")
    strings = [data.get(name) for name in ("node_id", "peer_addr", "tunnel_addr")]
    groups, logins = data.get("groups", []), data.get("logins", {})
    if (not all(isinstance(s, str) for s in strings) or not isinstance(groups, list)
            or not all(isinstance(g, str) for g in groups) or not isinstance(logins, dict)
            or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                       for v in logins.values())):
        raise ValueError("bad field types")
    numbers = [data.get("streams", 0), data.get("tunnels", 0)]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise ValueError("bad counts")
    return NodeRecord(node_id=strings[0], peer_addr=strings[1], tunnel_addr=strings[2],
                      groups=groups, streams=numbers[0], tunnels=numbers[1],
                      draining=bool(data.get("draining", False)),
                      logins={g: tuple(v) for g, v in logins.items()})


# -- Lua ---------------------------------------------------------------------------

# Shared tail: the live view.  KEYS[2] is the nodes set; ARGV[1] the key
# prefix of records.  Returns {now ms, {id, expiry, ...}, {record or false, ...}}.
_READ_VIEW = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
local records = {}
if #live > 0 then
  local keys = {}
  for i = 1, #live, 2 do keys[#keys + 1] = ARGV[1] .. live[i] end
  records = redis.call('MGET', unpack(keys))
end
return {now, live, records}
"""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: record, nodes, NADD group keys to join, NDROP group keys to leave,
# NPORT port keys to keep.  ARGV: record prefix, node id, ttl ms, record
# JSON, NADD, NDROP, NPORT, channel or "" (no notice), then NPORT claim values.
# Returns the view plus the port keys held by someone else now.
_WRITE_SCRIPT = _NOW + """
local node, ttl = ARGV[2], tonumber(ARGV[3])
local nadd, ndrop, nport = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local expiry = now + ttl
redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
redis.call('ZADD', KEYS[2], expiry, node)
redis.call('PEXPIRE', KEYS[2], ttl)
for i = 3, 2 + nadd do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], expiry, node)
  redis.call('PEXPIRE', KEYS[i], ttl)
end
for i = 3 + nadd, 2 + nadd + ndrop do redis.call('ZREM', KEYS[i], node) end
local lost = {}
for i = 1, nport do
  local key, value = KEYS[2 + nadd + ndrop + i], ARGV[8 + i]
  local current = redis.call('GET', key)
  if current == value then redis.call('PEXPIRE', key, ttl)
  elseif not current then redis.call('SET', key, value, 'PX', ttl)
  else lost[#lost + 1] = key end
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], node) end
local view = (function()""" + _READ_VIEW + """end)()
view[4] = lost
return view
"""

_READ_SCRIPT = _NOW + _READ_VIEW

# KEYS: record, nodes, group keys, port keys.  ARGV: node id, channel, NGROUP,
# then the port claim values.
_DEREGISTER_SCRIPT = """
local node, ngroup = ARGV[1], tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], node)
for i = 3, 2 + ngroup do redis.call('ZREM', KEYS[i], node) end
for i = 3 + ngroup, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1 - ngroup] then redis.call('DEL', KEYS[i]) end
end
redis.call('PUBLISH', ARGV[2], node)
return 1
"""

# KEYS: port key.  ARGV: claim value.  Delete only our own claim.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# -- connections -------------------------------------------------------------------

class _QuietClientService(ClientService):
    # Every retry would log a line while Redis is away; the registry logs
    # one line per change of state instead.
    _log = Logger(observer=lambda event: None)


class _RedisFactory(txredisapi.RedisFactory):
    """
    Builds txredisapi protocols (AUTH and SELECT at connection) for a
    C{ClientService}, which does the connecting; txredisapi's own pool is
    not used, so its Deferred is cleared and refusals go to the registry.
    """

    noisy = False

    def __init__(self, registry, protocol, target, db, reply_timeout):
        super().__init__(None, db, 1, password=target.password, username=target.username,
                         replyTimeout=reply_timeout, convertNumbers=False)
        self.protocol = protocol
        self.registry = registry
        self.deferred = None

    def connectionError(self, why):
        # AUTH or SELECT refused: the protocol closes; the service retries.
        self.registry._refused(why)


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.registry._command_lost(self, why)


class _EventsProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.registry._notice(message)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.registry._events_lost(self)


class _RecordingEndpoint:
    """
    Passes connects through, telling the registry why one failed and when
    that attempt began: C{failed(failure, began)}.
    """

    def __init__(self, endpoint, failed, clock):
        self._endpoint = endpoint
        self._failed = failed
        self._clock = clock

    def connect(self, factory):
        began = self._clock.seconds()
        return self._endpoint.connect(factory).addErrback(self._report, began)

    def _report(self, failure, began):
        self._failed(failure, began)
        return failure


# -- the registry -------------------------------------------------------------------

@implementer(IFleetRegistry)
class RedisFleetRegistry:
    """
    The fleet's view, kept in Redis.  See the module docstring.

    @param url: C{redis://} or C{rediss://} URL.
    @param node_id: this node's id.
    @param local_record: callable returning this node's L{NodeRecord} as it
        is now (its C{node_id} is replaced by C{node_id}; its C{logins}
        hold verifiers made by L{login_verifier}).
    @param heartbeat: seconds between refreshes; a record lives three.
    @param keep_peers: seconds the last view serves while Redis is away.
    @param on_port_lost: optional callable C{(port, owner)}: a claim this
        node held was found taken by another node (after Redis lost its
        data); the caller should stop forwarding it.
    @raise ValueError: for a bad URL (the message holds no password).
    """

    def __init__(self, url, node_id, local_record, heartbeat=2.0, keep_peers=60.0,
                 reactor=None, prefix=PREFIX, on_port_lost=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.target = parse_redis_url(url)
        if not node_id or any(c.isspace() or c in "/" for c in node_id):
            raise ValueError("bad fleet node id %r (no spaces or '/')" % (node_id,))
        self.node_id = node_id
        self._local_record = local_record
        self.heartbeat = heartbeat
        self.keep_peers = keep_peers
        self._ttl_ms = max(1, int(EXPIRY_BEATS * heartbeat * 1000))
        self._prefix = prefix
        self._record_prefix = prefix + "node:"
        self._nodes_key = prefix + "nodes"
        self._channel = prefix + "events"
        self._on_port_lost = on_port_lost
        self._timeout = max(1.0, heartbeat)
        self._salt = os.urandom(16)
        self._logins = LoginChecker(reactor)

        self.healthy = False
        self.redis_errors = 0  # failed commands and connection attempts
        self._state = "starting"  # "up", "down" or "dropped" once known
        self._last_ok = None  # reactor time of the last good round trip
        self._view = {}  # node id -> (NodeRecord, local expiry time)
        self._observers = []
        self._published_groups = set()
        self._ports = {}  # port -> claim value "NODE/OWNER"
        self._command = None  # the logged-in command protocol, or None
        self._events = None
        self._services = []
        self._beat = None
        self._write_running = self._write_again = self._write_scheduled = False
        self._publish_pending = False
        self._read_running = self._read_again = False
        self._expiry_call = self._drop_call = None
        self._started = None
        self._stopping = False
        self._refusals = 0  # logins refused in a row
        self._grace_until = None  # after an outage: keep missing peers until then
        self._carried = {}  # node id -> until when a grace keeps it (not in Redis since)

    @classmethod
    def from_config(cls, fleet, tunnel_port, local_record, reactor=None, on_port_lost=None):
        """
        The registry of C{gateway.fleet} (an L{anyproxy.config.model.FleetConfig}),
        for a gateway whose tunnel listener is on C{tunnel_port}.
        """
        return cls(fleet.redis, fleet.node_id or default_node_id(tunnel_port), local_record,
                   heartbeat=fleet.heartbeat, keep_peers=fleet.keep_peers, reactor=reactor,
                   on_port_lost=on_port_lost)

    def __repr__(self):
        return "<RedisFleetRegistry %s at %s>" % (self.node_id, self.target.display)

    # -- life cycle

    def start(self):
        """
        Connect (both connections), register and start the heartbeat.  The
        Deferred fires once the first attempt is decided, registered or not
        (an unreachable Redis is retried in the background); it never fails.
        """
        self._started = defer.Deferred()
        endpoint = _RecordingEndpoint(
            redis_endpoint(self._reactor, self.target, self._timeout), self._connect_failed,
            self._reactor)
        backoff = backoffPolicy(initialDelay=min(1.0, self.heartbeat),
                                maxDelay=max(1.0, 2 * self.heartbeat), factor=1.5)

        def retry(attempt):
            # ClientService starts counting again at each TCP connection, but
            # one refused at login (AUTH) must go on backing off.
            return backoff(max(attempt, self._refusals))
        for protocol, prepare in ((_CommandProtocol, self._command_connected),
                                  (_EventsProtocol, self._events_connected)):
            factory = _RedisFactory(self, protocol, self.target,
                                    self.target.db if protocol is _CommandProtocol else None,
                                    self._timeout)
            service = _QuietClientService(endpoint, factory, retryPolicy=retry,
                                          prepareConnection=prepare, clock=self._reactor)
            self._services.append(service)
            service.startService()
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = self._reactor
        self._beat.start(self.heartbeat, now=False)
        return self._started

    def stop(self):
        """
        Deregister (record, group entries and port claims deleted, a notice
        published) if Redis answers within a short time, then disconnect.
        Never fails.
        """
        self._stopping = True
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        for call in (self._expiry_call, self._drop_call):
            if call is not None and call.active():
                call.cancel()
        d = defer.succeed(None)
        if self._command is not None:
            d = self._deregister()
            d.addTimeout(self._timeout, self._reactor)
            d.addErrback(lambda f: log.warn(
                "fleet registry: could not deregister node {node} from {url}: {why}",
                node=self.node_id, url=self.target.display, why=f.getErrorMessage()))
        d.addCallback(lambda _: defer.DeferredList(
            [service.stopService() for service in self._services], consumeErrors=True))
        d.addCallback(self._stopped)
        return d

    def _stopped(self, _):
        self._command = self._events = None
        self.healthy = False
        if self._started is not None and not self._started.called:
            self._started.callback(None)
        return None

    def _deregister(self):
        groups = sorted(self._published_groups)
        ports = sorted(self._ports.items())
        keys = ([self._record_prefix + self.node_id, self._nodes_key]
                + [self._prefix + "group:" + g for g in groups]
                + [self._prefix + "port:%d" % p for p, _ in ports])
        args = [self.node_id, self._channel, len(groups)] + [v for _, v in ports]
        return self._command.eval(_DEREGISTER_SCRIPT, keys, args)

    # -- connections

    # The prepareConnection hooks return nothing: a ClientService whose
    # preparation is pending cannot take the connection's loss (AUTH
    # refused, Redis gone), so the login is awaited here instead, and a
    # connection lost before it is simply retried by the service.
    # whenConnected() fires, with the protocol itself (the service hands
    # over a proxy), once AUTH and SELECT are done.

    def _command_connected(self, proxy):
        proxy.whenConnected().addCallback(self._command_ready).addErrback(self._bug)

    def _command_ready(self, protocol):
        self._refusals = 0
        self._command = protocol
        # (Re-)registered: tell the others at once (Redis may have restarted empty).
        self._publish_pending = True
        self._write_soon()

    def _events_connected(self, proxy):
        proxy.whenConnected().addCallback(self._events_ready).addErrback(self._bug)

    def _events_ready(self, protocol):
        def subscribed(_):
            self._events = protocol
            # Notices sent while this connection was down are lost: read now.
            self._read_soon()
        # A failure here is the connection's loss, which the service retries.
        protocol.subscribe(self._channel).addCallbacks(subscribed, lambda _: None)

    def _command_lost(self, protocol, why):
        if protocol is self._command:
            self._command = None
            if not self._stopping:
                self._failed(why)

    def _events_lost(self, protocol):
        if protocol is self._events:
            self._events = None

    def _connect_failed(self, failure, began):
        # An attempt that began before Redis last answered says nothing new:
        # HostnameEndpoint reports a refusal only at its next attempt tick
        # (0.3 s), by when the other connection may have come up and been
        # answered.  Counting it would flap the state (down, then up again).
        if self._last_ok is not None and began < self._last_ok:
            self.redis_errors += 1
            return
        if not self._stopping:
            self._failed(failure)

    def _refused(self, why):
        self._refusals += 1
        if not self._stopping:
            self._failed(Failure(RegistryUnavailable(why)))

    # -- health

    def _failed(self, why):
        """A round trip or a connection failed: Redis is away (once per change)."""
        if self._stopping:
            return
        self.redis_errors += 1
        if self._state in ("down", "dropped"):
            return
        self.healthy = False
        reason = why.getErrorMessage() if isinstance(why, Failure) else str(why)
        self._cancel_expiry()
        if self._state == "starting":
            self._state = "dropped"  # no view to keep yet
            log.warn("fleet registry: cannot reach Redis at {url} ({why}); node {node} "
                     "retries in the background", url=self.target.display, why=reason,
                     node=self.node_id)
            self._fire_started()
            return
        self._state = "down"
        keep = self.keep_peers
        if self._last_ok is not None:
            keep = max(0.0, self._last_ok + self.keep_peers - self._reactor.seconds())
        log.warn("fleet registry: Redis at {url} unreachable ({why}); node {node} keeps "
                 "the last view of {peers} peers for {keep:.0f} s and retries",
                 url=self.target.display, why=reason, node=self.node_id,
                 peers=len(self._view), keep=keep)
        self._drop_call = self._reactor.callLater(keep, self._drop_view)
        self._fire_started()

    def _drop_view(self):
        self._drop_call = None
        if self._state != "down":
            return
        self._state = "dropped"
        log.warn("fleet registry: Redis at {url} still unreachable after {keep:.0f} s; "
                 "node {node} forgets its {peers} peers (local tunnels only)",
                 url=self.target.display, keep=self.keep_peers, node=self.node_id,
                 peers=len(self._view))
        if self._view:
            self._view = {}
            self._notify()

    def _succeeded(self):
        if self._stopping:
            return  # answers to what was in flight at stop()
        self._last_ok = self._reactor.seconds()
        if self._state != "up":
            was = self._state
            self._state = "up"
            self.healthy = True
            if self._drop_call is not None and self._drop_call.active():
                self._drop_call.cancel()
            self._drop_call = None
            if was == "down":
                # A restarted Redis holds none of the others until they
                # re-register (within their backoff): keep the cached ones
                # one record lifetime longer rather than flap.
                self._grace_until = self._last_ok + self._ttl_ms / 1000.0
            if was == "starting":
                log.info("fleet registry: node {node} registered at {url}",
                         node=self.node_id, url=self.target.display)
            else:
                log.warn("fleet registry: Redis at {url} answers again; node {node} "
                         "registered", url=self.target.display, node=self.node_id)

    def _fire_started(self):
        if self._started is not None and not self._started.called:
            self._started.callback(None)

    # -- writes

    def local_changed(self):
        """Publish this node's record after this reactor turn (calls coalesce)."""
        self._publish_pending = True
        self._write_soon()

    def _write_soon(self):
        if not self._write_scheduled and not self._stopping:
            self._write_scheduled = True
            self._reactor.callLater(0, self._scheduled_write)

    def _scheduled_write(self):
        self._write_scheduled = False
        self._write()

    def _heartbeat(self):
        self._write()

    def _write(self):
        if self._stopping:
            return
        if self._write_running:
            self._write_again = True
            return
        if self._command is None:
            # Not connected: the service reconnects and writes at once.
            return
        try:
            record = attr.evolve(self._local_record(), node_id=self.node_id)
            record_json = record_to_json(record)
        except Exception:
            # Never let the heartbeat's LoopingCall die of it.
            log.failure("fleet registry: could not build node {node}'s record", node=self.node_id)
            return
        groups = set(record.groups)
        joined = sorted(groups)
        left = sorted(self._published_groups - groups)
        ports = sorted(self._ports.items())
        publish = self._publish_pending
        self._publish_pending = False
        keys = ([self._record_prefix + self.node_id, self._nodes_key]
                + [self._prefix + "group:" + g for g in joined]
                + [self._prefix + "group:" + g for g in left]
                + [self._prefix + "port:%d" % p for p, _ in ports])
        args = ([self._record_prefix, self.node_id, self._ttl_ms, record_json,
                 len(joined), len(left), len(ports), self._channel if publish else ""]
                + [v for _, v in ports])
        self._write_running = True
        try:
            d = self._command.eval(_WRITE_SCRIPT, keys, args)
        except txredisapi.ConnectionError as e:
            d = defer.fail(e)

        def written(reply):
            self._published_groups = groups
            self._ports_lost(reply[3] if len(reply) > 3 else [], dict(ports))
            self._succeeded()
            self._apply_view(reply)
            self._fire_started()

        def failed(failure):
            self._publish_pending |= publish
            self._failed(failure)

        def done(_):
            self._write_running = False
            if self._write_again:
                self._write_again = False
                self._write()
        d.addCallbacks(written, failed).addErrback(self._bug).addBoth(done)

    def _ports_lost(self, lost_keys, claimed):
        for key in lost_keys or ():
            port = int(key.rpartition(":")[2])
            value = claimed.get(port)
            if value is None or self._ports.get(port) != value:
                continue  # released meanwhile
            del self._ports[port]
            owner = value.partition("/")[2]
            log.warn("fleet registry: forwarded port {port} of client {owner} is now "
                     "claimed by another node", port=port, owner=owner)
            if self._on_port_lost is not None:
                self._on_port_lost(port, owner)

    # -- reads

    def _notice(self, message):
        if message != self.node_id:
            self._read_soon()

    def _read_soon(self):
        if self._stopping or self._command is None:
            return
        if self._read_running:
            self._read_again = True
            return
        self._read_running = True
        keys = [self._record_prefix, self._nodes_key]
        try:
            d = self._command.eval(_READ_SCRIPT, keys, [self._record_prefix])
        except txredisapi.ConnectionError as e:
            d = defer.fail(e)

        def read(reply):
            self._succeeded()
            self._apply_view(reply)

        def done(_):
            self._read_running = False
            if self._read_again:
                self._read_again = False
                self._read_soon()
        d.addCallbacks(read, self._failed).addErrback(self._bug).addBoth(done)

    def _apply_view(self, reply):
        """Replace the cached view by the C{{now, live, records}} a script returned."""
        if self._stopping:
            return
        now_ms, live, records = int(reply[0]), reply[1] or [], reply[2] or []
        # Expiries are in Redis's clock: map them onto ours.
        offset = self._reactor.seconds() - now_ms / 1000.0
        view = {}
        for index, text in enumerate(records):
            node_id, expiry_ms = live[2 * index], float(live[2 * index + 1])
            if node_id == self.node_id or not text:
                continue
            try:
                record = record_from_json(text)
            except ValueError as e:
                log.debug("fleet registry: ignoring the record of node {node}: {why}",
                          node=node_id, why=e)
                continue
            if record.node_id != node_id:
                continue
            view[node_id] = (record, expiry_ms / 1000.0 + offset)
        carried = self._carried
        for node_id in view:
            carried.pop(node_id, None)  # in Redis again
        if self._grace_until is not None:
            now = self._reactor.seconds()
            if now < self._grace_until:
                for node_id, (record, _) in self._view.items():
                    if node_id in view:
                        continue
                    # Carried once, until the grace that first carried it: a
                    # Redis connection that keeps failing and recovering must
                    # not keep a killed node in routing.
                    until = carried.setdefault(node_id, self._grace_until)
                    if now < until:
                        view[node_id] = (record, until)
            else:
                self._grace_until = None
        for node_id in [n for n in carried if n not in view]:
            del carried[node_id]
        changed = self._differs(view)
        self._view = view
        self._schedule_expiry()
        if changed:
            self._notify()

    def _differs(self, view):
        if view.keys() != self._view.keys():
            return True
        return any(record != self._view[n][0] or record.logins != self._view[n][0].logins
                   for n, (record, _) in view.items())

    def _schedule_expiry(self):
        self._cancel_expiry()
        if self._view and self._state == "up":
            soonest = min(expiry for _, expiry in self._view.values())
            delay = max(0.0, soonest - self._reactor.seconds())
            self._expiry_call = self._reactor.callLater(delay, self._expire)

    def _cancel_expiry(self):
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None

    def _expire(self):
        """Drop the records whose time is up, between reads (a killed node)."""
        self._expiry_call = None
        now = self._reactor.seconds()
        view = {n: entry for n, entry in self._view.items() if entry[1] > now}
        changed = len(view) != len(self._view)
        self._view = view
        self._schedule_expiry()
        if changed:
            self._notify()

    def _notify(self):
        for callback in list(self._observers):
            try:
                callback()
            except Exception:
                log.failure("fleet registry: a view observer failed")

    def _bug(self, failure):
        log.failure("fleet registry: unexpected error", failure)

    # -- readers (the cached view only)

    def nodes(self):
        return [record for record, _ in sorted(self._view.values(), key=lambda e: e[0].node_id)]

    def nodes_for_group(self, group):
        return [record for record in self.nodes()
                if group in record.groups and not record.draining]

    def add_observer(self, callback):
        self._observers.append(callback)

    def remove_observer(self, callback):
        """Stop calling C{callback} (harmless if it was not added)."""
        if callback in self._observers:
            self._observers.remove(callback)

    def view_age(self):
        """Seconds since Redis last answered, or C{None} if it never did."""
        if self._last_ok is None:
            return None
        return self._reactor.seconds() - self._last_ok

    # -- group logins

    def login_verifier(self, password):
        """The verifier of C{password} to publish in this node's record (one salt per node)."""
        return make_login_verifier(password, self._salt)

    def check_group_login(self, group, password):
        verifiers = []
        for record in self.nodes():
            verifiers.extend(record.logins.get(group, ()))
        if not verifiers:
            return False
        return self._logins.check(verifiers, password)

    # -- forwarded ports

    def _claim_value(self, owner):
        return "%s/%s" % (self.node_id, owner)

    @defer.inlineCallbacks
    def claim_port(self, port, owner):
        """
        See L{IFleetRegistry.claim_port}; fails with L{RegistryUnavailable}
        while Redis cannot be reached (no claim can be decided then).
        """
        if self._command is None or self._stopping:
            raise RegistryUnavailable("Redis at %s is not connected" % (self.target.display,))
        key, value = self._prefix + "port:%d" % (port,), self._claim_value(owner)
        command = self._command
        try:
            taken = yield command.set(key, value, pexpire=self._ttl_ms, only_if_not_exists=True)
            if taken is None:
                current = yield command.get(key)
                if current != value:
                    return False
                yield command.execute_command("PEXPIRE", key, self._ttl_ms)
        except txredisapi.ConnectionError as e:
            raise RegistryUnavailable("Redis at %s: %s" % (self.target.display, e)) from None
        self._ports[port] = value
        return True

    @defer.inlineCallbacks
    def release_port(self, port, owner):
        """See L{IFleetRegistry.release_port}; never fails (the claim expires anyway)."""
        value = self._claim_value(owner)
        if self._ports.get(port) == value:
            del self._ports[port]
        # Sent even for a claim we never heard back about (it timed out): it
        # may have landed.  The script deletes the key only if it holds our
        # value, and on the one connection it comes after the claim's SET.
        if self._command is None:
            return
        try:
            yield self._command.eval(_RELEASE_SCRIPT, [self._prefix + "port:%d" % (port,)],
                                     [value])
        except Exception as e:
            log.info("fleet registry: port {port} not released in Redis ({why}); it expires",
                     port=port, why=str(e))

    @defer.inlineCallbacks
    def port_holder(self, port):
        """
        See L{IFleetRegistry.port_holder}; fails with L{RegistryUnavailable}
        while Redis cannot be reached.
        """
        if self._command is None or self._stopping:
            raise RegistryUnavailable("Redis at %s is not connected" % (self.target.display,))
        try:
            value = yield self._command.get(self._prefix + "port:%d" % (port,))
        except txredisapi.ConnectionError as e:
            raise RegistryUnavailable("Redis at %s: %s" % (self.target.display, e)) from None
        if not value:
            return None
        node_id, _, owner = value.partition("/")
        return (node_id, owner)

    def claimed_ports(self):
        """The ports this node holds, C{{port: owner}}."""
        return {port: value.partition("/")[2] for port, value in self._ports.items()}


# -- metrics ------------------------------------------------------------------------

class FleetRegistryCollector(Collector):
    """
    The registry's metrics, read at scrape time; register it in the
    gateway's C{CollectorRegistry}
    (C{metrics.registry.register(FleetRegistryCollector(registry))}).
    """

    def __init__(self, registry):
        self._registry = registry

    def collect(self):
        registry = self._registry
        yield GaugeMetricFamily("anyproxy_fleet_registry_up",
                                "1 while the fleet registry's Redis answers, else 0.",
                                value=1 if registry.healthy else 0)
        yield GaugeMetricFamily("anyproxy_fleet_peers_known",
                                "Other fleet nodes in this node's view (the cached one "
                                "while Redis is away).", value=len(registry.nodes()))
        yield CounterMetricFamily("anyproxy_fleet_redis_errors",
                                  "Failed Redis round trips and connection attempts of "
                                  "the fleet registry.", value=registry.redis_errors)
        yield GaugeMetricFamily("anyproxy_fleet_port_claims",
                                "Forwarded ports this node holds fleet-wide.",
                                value=len(registry.claimed_ports()))
