# -*- test-case-name: tests.test_client_udp -*-
"""
The client's side of a UDP association (SOCKS5 UDP ASSOCIATE over the tunnel).

Why it is built this way
------------------------
A udp stream has no single target: each DATAGRAM frame names its own
destination, and replies must come back from whichever target answered (a
DNS server, a game server, several hosts at once).  So one association owns
its own unconnected UDP sockets, one per address family, created lazily on
the first destination of that family, and every reply is sent back through
the tunnel labelled with the address it came from.

Every datagram gets the same access control as a TCP stream: the name asked
for is checked before DNS, the name is resolved, every address is checked,
and the datagram goes only to a checked address (never re-resolved, so DNS
rebinding cannot slip past).  Refused datagrams are dropped and counted; the
association stays usable, as UDP has no per-datagram error channel.

Resolution is asynchronous and a chatty client may send many datagrams to one
name, so each association keeps a small cache (bounded size, short TTL, since
an C{IHostnameResolver} does not tell us the record's TTL).  Datagrams that
arrive while their name is still resolving wait in a small bounded queue and
are sent once the answer is in; beyond the bound they are dropped (UDP may
drop, memory may not grow).

Replies are filtered "address-restricted cone" style: a datagram from a
target is passed back only if its IP is one this association has sent to
(any port).  Full cone would let anyone who learns the socket's port inject
datagrams into the user's association; port-restricted would break servers
that answer from another port (TFTP, some STUN/VoIP setups).

Payloads are never logged.
"""

import collections
import socket

import attr
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger

from anyproxy.access_policy import UDP, normalise_address, normalise_name
from anyproxy.datagram_socket import direct_sender, refused_earlier

log = Logger()

# Largest UDP payload over IPv6 (IPv4's is 65,507); recvfrom must not truncate.
MAX_DATAGRAM = 65535
# Socket buffers: a burst of 60 KB datagrams must not overflow the kernel's
# default (~200 KB) buffer.  Best effort: the kernel may cap it (rmem_max).
SOCKET_BUFFER = 1024 * 1024
# Name cache: short, because the resolver API hides the record TTL; bounded,
# because the user chooses the names.
CACHE_TTL = 30.0
NEGATIVE_TTL = 5.0
MAX_CACHE_ENTRIES = 64
# Resolution in progress: few names at once, few datagrams waiting for them.
MAX_RESOLVING = 16
MAX_PENDING_DATAGRAMS = 64
MAX_PENDING_BYTES = 256 * 1024
# Giving up on a resolver that never answers.
RESOLVE_TIMEOUT = 10.0
# IPs we sent to, for the reply filter (oldest forgotten first).
MAX_PEERS = 1024
# Ports remembered per peer, for a reload's recheck (L{_recheck_peers}).
MAX_PEER_PORTS = 16
# Access-control verdicts remembered for IP literals (cleared when full).
MAX_VERDICTS = 1024

_INTERFACES = {4: "0.0.0.0", 6: "::"}


@attr.s(slots=True)
class UdpStats:
    """
    UDP counters, per association and aggregated over all (L{Dialer.udp_stats}).

    @ivar sent: datagrams sent to targets.
    @ivar received: datagrams from targets passed back through the tunnel.
    @ivar bytes_sent: payload bytes of C{sent}.
    @ivar bytes_received: payload bytes of C{received}.
    @ivar dropped_acl: datagrams refused by access control.
    @ivar dropped_error: datagrams lost to an error: the name did not resolve,
        the wait queue was full, the socket refused the send, the tunnel was
        congested, a bad port.
    @ivar dropped_unsolicited: datagrams from an IP this association never
        sent to (the address-restricted filter).
    @ivar associations: associations opened (only meaningful in an aggregate).
    """

    sent = attr.ib(default=0)
    received = attr.ib(default=0)
    bytes_sent = attr.ib(default=0)
    bytes_received = attr.ib(default=0)
    dropped_acl = attr.ib(default=0)
    dropped_error = attr.ib(default=0)
    dropped_unsolicited = attr.ib(default=0)
    associations = attr.ib(default=0)


def serves_udp(policy):
    """
    Whether C{policy} could admit any UDP datagram at all.

    C{False} when C{allow_udp} is off, or when there is an allow-list and no
    entry of it admits UDP: such an association could only drop datagrams,
    so it is better refused up front (PROTOCOL_NOT_ALLOWED).
    """
    if not policy.allow_udp:
        return False
    return not policy.allowed or any(entry.admits(UDP) for entry in policy.allowed)


class _TargetSocket(DatagramProtocol):
    """One UDP socket of an association: forwards what arrives to its owner."""

    noisy = False

    def __init__(self, association):
        self._association = association

    def datagramReceived(self, data, addr):
        self._association._target_datagram(addr[0], addr[1], data)

    def connectionRefused(self):
        # ICMP unreachable reported by the kernel: the datagram is lost, no more.
        self._association._count("dropped_error")


class TargetAssociation(Protocol):
    """
    The protocol of an accepted udp stream: sends the user's datagrams to
    their targets and passes the targets' replies back.

    @param get_policy: a zero-argument callable returning the current
        L{anyproxy.access_policy.AccessPolicy} (read per datagram, so a reload
        applies to live associations).
    @param reactor: provides C{listenUDP}.
    @param resolve_name: C{resolve_name(host, port)} -> Deferred firing with a
        list of IP address strings (see L{anyproxy.client.dialer.resolve}).
    @param idle_timeout: seconds without a datagram either way before the
        association is closed; 0 = never.
    @param parent_stats: a L{UdpStats} that aggregates this association's.
    @param on_close: called with this association once it has ended.
    @param clock: an C{IReactorTime}; default C{reactor}.

    @ivar stats: this association's L{UdpStats}.
    """

    def __init__(self, get_policy, reactor, resolve_name, idle_timeout=0, parent_stats=None,
                 on_close=None, clock=None):
        self._get_policy = get_policy
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._resolve_name = resolve_name
        self.idle_timeout = idle_timeout
        self.stats = UdpStats()
        self._parent_stats = parent_stats
        self._on_close = on_close
        self._ports = {}  # IP version -> listening port
        self._senders = {}  # IP version -> its port's direct_sender
        self._closing = []  # Deferreds of ports being stopped
        # IP string -> the ports sent to there (some of them), in order of use.
        self._peers = collections.OrderedDict()
        # The policy the peers were checked under: a reload forgets them.
        self._peers_policy = None
        self._verdicts = {}  # (IP literal, port) -> (policy, IP to send to or None: refused, version)
        self._cache = collections.OrderedDict()  # name -> (expiry, addresses or None)
        self._resolving = {}  # name -> (Deferred, [(host, port, payload), ...])
        self._pending_count = 0
        self._pending_bytes = 0
        self._last_activity = 0.0
        self._idle_call = None
        self._closed = False
        self._logged = set()  # what we already warned about once
        if parent_stats is not None:
            parent_stats.associations += 1

    # -- stream protocol --------------------------------------------------

    def connectionMade(self):
        self._last_activity = self._clock.seconds()
        if self.idle_timeout:
            self._idle_call = self._clock.callLater(self.idle_timeout, self._idle_check)

    def datagram_received(self, host, port, payload):
        """A datagram from the user, for C{host:port} (an IP literal or a name)."""
        if self._closed:
            return
        self._last_activity = self._clock.seconds()
        if not 0 < port < 65536:
            self._count("dropped_error")
            return
        policy = self._get_policy()
        # An IP literal: its verdict depends only on the policy (immutable;
        # a reload makes a new one), so remember it for the next datagrams.
        verdict = self._verdicts.get((host, port))
        if verdict is not None and verdict[0] is policy:
            if verdict[1] is None:
                self._refused(host, port)
            else:
                self._send(verdict[1], port, payload, verdict[2])
            return
        try:
            address = normalise_address(host)
        except ValueError:
            # A name: checked before DNS, then again with what it resolves to.
            if policy.check_name(host, port, UDP) is not None:
                self._refused(host, port)
                return
            self._to_name(host, port, payload)
            return
        refused = policy.check_resolved(host, port, UDP, [address]) is not None
        if len(self._verdicts) >= MAX_VERDICTS:
            self._verdicts.clear()
        self._verdicts[(host, port)] = (policy, None if refused else str(address),
                                        address.version)
        if refused:
            self._refused(host, port)
        else:
            self._send(str(address), port, payload, address.version)

    def connectionLost(self, reason=None):
        """The association ended: close the sockets, cancel timers and lookups."""
        if self._closed:
            return
        self._closed = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        resolving, self._resolving = self._resolving, {}
        for d, _ in resolving.values():
            d.cancel()
        self._pending_count = self._pending_bytes = 0
        for port in self._ports.values():
            d = port.stopListening()
            if d is not None:
                self._closing.append(d)
        self._ports.clear()
        self._senders.clear()
        self._peers.clear()
        self._cache.clear()
        self._verdicts.clear()
        stats = self.stats
        log.debug("udp association closed: sent={sent} received={received} "
                  "dropped_acl={acl} dropped_error={err} dropped_unsolicited={unsolicited}",
                  sent=stats.sent, received=stats.received, acl=stats.dropped_acl,
                  err=stats.dropped_error, unsolicited=stats.dropped_unsolicited)
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    def wait_closed(self):
        """
        A Deferred firing once every socket of this (ended) association is
        closed; Twisted closes a UDP port on the next reactor turn.
        """
        return defer.gatherResults(list(self._closing)).addCallback(lambda _: None)

    # -- names ------------------------------------------------------------

    def _to_name(self, host, port, payload):
        name = normalise_name(host)
        entry = self._cache.get(name)
        if entry is not None:
            expiry, addresses = entry
            if expiry > self._clock.seconds():
                if addresses is None:
                    self._count("dropped_error")  # recently failed to resolve
                else:
                    self._send_checked(host, port, payload, addresses)
                return
            del self._cache[name]
        waiting = self._resolving.get(name)
        if waiting is None and len(self._resolving) >= MAX_RESOLVING:
            self._count("dropped_error")
            return
        if (self._pending_count >= MAX_PENDING_DATAGRAMS
                or self._pending_bytes + len(payload) > MAX_PENDING_BYTES):
            self._count("dropped_error")
            return
        self._pending_count += 1
        self._pending_bytes += len(payload)
        if waiting is not None:
            waiting[1].append((host, port, payload))
            return
        queue = [(host, port, payload)]
        d = self._resolve_name(host, port)
        self._resolving[name] = (d, queue)
        d.addTimeout(RESOLVE_TIMEOUT, self._clock)
        d.addCallbacks(lambda addresses: self._resolved(name, addresses),
                       lambda failure: self._resolve_failed(name, failure))
        d.addErrback(lambda failure: log.failure("udp: handling a resolution failed", failure))

    def _resolved(self, name, addresses):
        try:
            checked = [normalise_address(address) for address in addresses]
        except ValueError:
            checked = None
        checked = checked or None
        self._remember(name, checked, CACHE_TTL if checked else NEGATIVE_TTL)
        self._flush_waiting(name, checked)

    def _resolve_failed(self, name, failure):
        if self._closed:
            return  # cancelled by connectionLost
        if "resolve" not in self._logged:
            self._logged.add("resolve")
            log.info("udp: {name} did not resolve: {why}", name=name,
                     why=failure.getErrorMessage())
        self._remember(name, None, NEGATIVE_TTL)
        self._flush_waiting(name, None)

    def _remember(self, name, addresses, ttl):
        if self._closed:
            return
        while len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        self._cache[name] = (self._clock.seconds() + ttl, addresses)

    def _flush_waiting(self, name, addresses):
        entry = self._resolving.pop(name, None)
        if entry is None or self._closed:
            return
        for host, port, payload in entry[1]:
            self._pending_count -= 1
            self._pending_bytes -= len(payload)
            if addresses is None:
                self._count("dropped_error")
            else:
                self._send_checked(host, port, payload, addresses)

    # -- sending ----------------------------------------------------------

    def _send_checked(self, host, port, payload, addresses):
        """Check every address C{host} stands for; send to the first one."""
        if self._closed:
            return
        if self._get_policy().check_resolved(host, port, UDP, addresses) is not None:
            self._refused(host, port)
            return
        address = addresses[0]
        self._send(str(address), port, payload, address.version)

    def _send(self, ip, port, payload, version):
        """Send C{payload} to C{ip:port}, already checked; C{version} is C{ip}'s."""
        if self._closed:
            return
        sendto = self._senders.get(version)
        if sendto is None:
            sendto = self._socket(version)
            if sendto is None:
                self._count("dropped_error")
                return
        try:
            sendto(payload, (ip, port))
        except (OSError, ValueError, error.MessageLengthError) as e:
            if not refused_earlier(e):
                # ENETUNREACH, EACCES (broadcast), EMSGSIZE...: this datagram is lost.
                self._count("dropped_error")
                if "send" not in self._logged:
                    self._logged.add("send")
                    log.info("udp: sending to {ip}:{port} failed: {why}", ip=ip, port=port, why=e)
                return
        peers = self._peers
        if self._get_policy() is not self._peers_policy:
            self._recheck_peers()
        ports = peers.get(ip)
        if ports is not None:
            peers.move_to_end(ip)
        else:
            if len(peers) >= MAX_PEERS:
                peers.popitem(last=False)
            ports = peers[ip] = set()
        if len(ports) < MAX_PEER_PORTS:
            ports.add(port)
        # Counted with plain attributes (not through _count): this runs once
        # per datagram, for this association and the client's totals.
        size = len(payload)
        stats = self.stats
        stats.sent += 1
        stats.bytes_sent += size
        stats = self._parent_stats
        if stats is not None:
            stats.sent += 1
            stats.bytes_sent += size

    def _socket(self, version):
        """
        Bind this association's socket for IP C{version}.

        @return: its L{direct_sender}, or C{None} if it cannot be bound.
        """
        try:
            port = self._reactor.listenUDP(0, _TargetSocket(self), interface=_INTERFACES[version],
                                           maxPacketSize=MAX_DATAGRAM)
        except error.CannotListenError as e:
            if ("listen", version) not in self._logged:
                self._logged.add(("listen", version))
                log.warn("udp: no IPv{version} socket: {why}", version=version, why=e)
            return None
        sock = getattr(port, "socket", None)
        if sock is not None:
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    pass  # best effort: keep the kernel's size
        self._ports[version] = port
        sendto = self._senders[version] = direct_sender(port)
        return sendto

    # -- replies ----------------------------------------------------------

    def _recheck_peers(self):
        # A reload: replies come only from addresses the policy in force
        # still lets this association send to (any port: peers are kept by
        # address), so a target it now forbids is heard no more.
        policy = self._peers_policy = self._get_policy()
        for ip in list(self._peers):
            if not any(policy.check_resolved(ip, port, UDP, [ip]) is None
                       for port in self._peers[ip]):
                del self._peers[ip]

    def _target_datagram(self, host, port, payload):
        if self._closed:
            return
        if ":" in host:
            host = str(normalise_address(host))  # drops a zone, folds v4-mapped
        if self._get_policy() is not self._peers_policy:
            self._recheck_peers()
        if host not in self._peers:
            self._count("dropped_unsolicited")
            return
        self._last_activity = self._clock.seconds()
        if self.transport.send_datagram(host, port, payload):
            size = len(payload)
            stats = self.stats
            stats.received += 1
            stats.bytes_received += size
            stats = self._parent_stats
            if stats is not None:
                stats.received += 1
                stats.bytes_received += size
        else:
            self._count("dropped_error")  # tunnel congested or closing

    # -- bookkeeping ------------------------------------------------------

    def _idle_check(self):
        self._idle_call = None
        if self._closed:
            return
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for >= self.idle_timeout:
            log.debug("udp association idle for {seconds}s: closing", seconds=self.idle_timeout)
            self.transport.loseConnection()
            return
        # Re-arm for the remainder rather than resetting a timer per datagram.
        self._idle_call = self._clock.callLater(self.idle_timeout - idle_for, self._idle_check)

    def _refused(self, host, port):
        self._count("dropped_acl")
        if "acl" not in self._logged:
            self._logged.add("acl")
            log.warn("udp: refused datagrams to {host}:{port} (access control)",
                     host=host, port=port)

    def _count(self, name, amount=1):
        setattr(self.stats, name, getattr(self.stats, name) + amount)
        if self._parent_stats is not None:
            parent = self._parent_stats
            setattr(parent, name, getattr(parent, name) + amount)
