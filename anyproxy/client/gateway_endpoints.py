# -*- test-case-name: tests.test_gateway_addresses -*-
"""
How the client reaches a gateway address: the TCP endpoint under the
tunnel's TLS.

  - B{Directly}: Twisted's C{HostnameEndpoint}, which resolves the name and
    tries every address it gets, IPv6 and IPv4, Happy-Eyeballs style (a new
    attempt every 0.3 s while earlier ones are pending; the first to
    connect wins).  The resolver is injectable (L{ResolvingReactor}) so
    that tests never ask the system's.
  - B{Through an egress proxy} (C{client.egress_proxy}, else the standard
    C{HTTPS_PROXY} / C{ALL_PROXY} / C{NO_PROXY} environment):
    L{anyproxy.client.egress.EgressProxyEndpoint}.  TLS still runs end to
    end to the gateway, wrapped around whichever endpoint this gives.
  - B{From DNS SRV records} (C{gateway_addr: "srv:_anyproxy._tcp.example.com"}):
    L{SrvEndpoint}.  One SRV name is one gateway service: each connection
    attempt (at start and at every reconnect) looks the records up again,
    orders them as RFC 2782 says (lowest priority first; within a priority,
    a weighted random order) and dials the targets in turn until one
    connects, each target directly or through the egress proxy, with TLS
    verified against the target's own name (or C{gateway_server_name}).
    Looking up per attempt, rather than on a timer, follows changes to the
    records at the moment they matter, and the resolver's cache keeps it to
    one query per TTL.  With C{replicas} above 1 each tunnel draws its own
    order, so the tunnels spread over a priority's targets by weight.
"""

import ipaddress
import random as random_module

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHostnameResolver, IHostResolution, IReactorPluggableNameResolver, IStreamClientEndpoint)
from twisted.logger import Logger
from twisted.names import dns
from zope.interface import directlyProvides, implementer, providedBy

from anyproxy.addresses import host_port
from anyproxy.client.egress import EgressProxyEndpoint, proxy_from_environment
from anyproxy.errors import ConfigError

log = Logger()

SRV_PREFIX = "srv:"
# The port of an SRV gateway's key in the client's tables, which are keyed by
# (host, port): (SRV_PREFIX + name, SRV_PORT).  No real address has port 0.
SRV_PORT = 0


def srv_key(name):
    """The C{(host, port)}-shaped key of the SRV gateway C{name}."""
    return (SRV_PREFIX + name, SRV_PORT)


def srv_name(key):
    """The SRV name of a gateway key, or C{None} for a C{host:port} one."""
    host, port = key
    if port == SRV_PORT and host.startswith(SRV_PREFIX):
        return host[len(SRV_PREFIX):]
    return None


def gateway_label(key):
    """A gateway key as operators wrote it: C{host:port} or C{srv:name}."""
    return key[0] if srv_name(key) is not None else host_port(*key)


def gateway_url(key):
    """The tunnel's WebSocket URL for a gateway key (an SRV one names the service)."""
    name = srv_name(key)
    return "wss://%s/anyproxy" % (name if name is not None else host_port(*key),)


# -- name resolution ------------------------------------------------------------

@implementer(IHostResolution)
class _Literal:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class LiteralFirst:
    """
    An C{IHostnameResolver} answering IP literals itself and asking
    C{resolver} for names: a literal needs no lookup (the system resolver
    would spend a thread on it, and a test resolver need not know it).
    """

    def __init__(self, resolver):
        self._resolver = resolver

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        try:
            address = ipaddress.ip_address(hostName.strip("[]"))
        except ValueError:
            return self._resolver.resolveHostName(receiver, hostName, portNumber,
                                                  addressTypes, transportSemantics)
        resolution = _Literal(hostName)
        receiver.resolutionBegan(resolution)
        kind = IPv6Address if address.version == 6 else IPv4Address
        receiver.addressResolved(kind("TCP", str(address), portNumber))
        receiver.resolutionComplete()
        return resolution


class ResolvingReactor:
    """
    C{reactor} with C{nameResolver} replaced: what C{HostnameEndpoint} takes
    its resolver from.  Everything else is the reactor's own.
    """

    def __init__(self, reactor, resolver):
        self._reactor = reactor
        self.nameResolver = resolver
        directlyProvides(self, providedBy(reactor), IReactorPluggableNameResolver)

    def __getattr__(self, name):
        return getattr(self._reactor, name)


# -- one address -----------------------------------------------------------------

def egress_proxy_for(client, host, environ=None, port=None):
    """
    The L{anyproxy.client.egress.ProxyURL} to dial gateway C{host} (port
    C{port}) through: C{client.egress_proxy}, else the environment's, else
    C{None}.

    @raise ConfigError: the environment's proxy variable is not a proxy URL.
    """
    if client.egress_proxy is not None:
        return client.egress_proxy
    try:
        return proxy_from_environment(host, environ, port)
    except ValueError as e:
        raise ConfigError("HTTPS_PROXY/ALL_PROXY in the environment: %s (or set "
                          "client.egress_proxy)" % (e,)) from None


def tcp_endpoint(reactor, client, host, port, resolver=None, environ=None):
    """
    The endpoint under TLS for gateway C{host:port}: through the egress proxy
    if there is one (L{egress_proxy_for}), else directly (every address the
    name resolves to, Happy Eyeballs).

    @param resolver: an C{IHostnameResolver} for the gateway's (or the
        proxy's) name; C{None}: the reactor's.
    """
    resolving = ResolvingReactor(reactor, LiteralFirst(
        resolver if resolver is not None else reactor.nameResolver))
    proxy = egress_proxy_for(client, host, environ, port)
    if proxy is not None:
        return EgressProxyEndpoint(resolving, proxy, host, port, timeout=client.connect_timeout)
    return HostnameEndpoint(resolving, host, port, timeout=client.connect_timeout)


def describe_route(client, key, environ=None):
    """One phrase for the start-up log: how gateway C{key} is dialed."""
    name = srv_name(key)
    if name is not None:
        if client.egress_proxy is not None:
            return "the targets of DNS SRV %s, through egress proxy %s" % (
                name, client.egress_proxy)
        # NO_PROXY is applied to each target's name as it is dialed.
        proxy = egress_proxy_for(client, "", environ)
        return "the targets of DNS SRV %s, %s" % (
            name, "directly" if proxy is None else
            "through egress proxy %s (from the environment) unless NO_PROXY exempts "
            "the target" % (proxy,))
    proxy = egress_proxy_for(client, key[0], environ, key[1])
    return "directly" if proxy is None else "through egress proxy %s%s" % (
        proxy, "" if client.egress_proxy is not None else " (from the environment)")


# -- SRV ---------------------------------------------------------------------------

def rfc2782_order(records, random=random_module.random):
    """
    The order to try SRV C{records} in (RFC 2782, "Usage rules"): by
    priority, lowest first; within one priority, repeatedly pick a record
    with probability proportional to its weight (records of weight 0 have a
    small chance, first among themselves, in a random order: with every
    weight 0, as is common, each client starts at a record of its own).

    @param records: C{twisted.names.dns.Record_SRV}s.
    @param random: a function returning a float in [0, 1).
    @return: a list of C{(target host, port)}.
    """
    ordered = []
    for priority in sorted({record.priority for record in records}):
        # Weight 0 first, as the RFC's selection algorithm arranges them,
        # "in any order": a random one, or the first would always win a tie.
        group = sorted((r for r in records if r.priority == priority),
                       key=lambda r: (r.weight != 0, random()))
        while group:
            total = sum(record.weight for record in group)
            threshold = int(random() * (total + 1))  # an integer in [0, total]
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= threshold:
                    break
            chosen = group.pop(index)
            ordered.append((str(chosen.target).rstrip("."), chosen.port))
    return ordered


class NoSrvTargets(error.ConnectError):
    """The SRV name has no usable records."""


@implementer(IStreamClientEndpoint)
class SrvEndpoint:
    """
    Connects to one of the targets of the SRV records of C{name}, looked up
    at each C{connect} (see the module docstring).

    @param dns_resolver: a C{twisted.names} C{IResolver} (its
        C{lookupService}).
    @param target_endpoint: C{(host, port) -> IStreamClientEndpoint}, TLS
        included, for one target.
    """

    def __init__(self, name, dns_resolver, target_endpoint, random=random_module.random):
        self.name = name
        self._dns = dns_resolver
        self._target_endpoint = target_endpoint
        self._random = random

    def __repr__(self):
        return "<SrvEndpoint %s>" % (self.name,)

    def targets(self):
        """A Deferred firing with the targets in the order to try (L{rfc2782_order})."""
        d = self._dns.lookupService(self.name)

        def ordered(result):
            answers = result[0]
            records = [rr.payload for rr in answers if rr.type == dns.SRV]
            # RFC 2782: a single record whose target is "." means "not here".
            usable = [r for r in records if str(r.target) not in ("", ".")]
            if not usable:
                raise NoSrvTargets(string="DNS SRV %s: no targets" % (self.name,))
            return rfc2782_order(usable, self._random)

        def failed(failure):
            raise NoSrvTargets(string="DNS SRV %s: lookup failed: %s" % (
                self.name, failure.getErrorMessage() or failure.type.__name__))

        return d.addCallbacks(ordered, failed)

    def connect(self, protocol_factory):
        """
        Look the targets up, then try each in turn; cancelling stops the
        step in progress and tries no further target (whatever error the
        cancelled step fails with: a proxy's, a resolver's).
        """
        cancelled = []
        step = [None]  # the Deferred of the step in progress

        def cancel(_):
            cancelled.append(True)
            if step[0] is not None:
                step[0].cancel()

        outcome = defer.Deferred(cancel)
        problems = []

        def attempt(targets, index):
            if index == len(targets):
                outcome.errback(error.ConnectError(
                    string="DNS SRV %s: every target failed (%s)" % (self.name, "; ".join(problems))))
                return
            host, port = targets[index]

            def connected(protocol):
                step[0] = None
                if cancelled:  # it connected as we gave up: nobody wants it
                    transport = getattr(protocol, "transport", None)
                    if transport is not None:
                        transport.abortConnection()
                    return
                log.debug("DNS SRV {name}: connected to {target}", name=self.name,
                          target=host_port(host, port))
                outcome.callback(protocol)

            def failed(failure):
                step[0] = None
                if cancelled:
                    return
                problems.append("%s: %s" % (host_port(host, port), failure.getErrorMessage()))
                attempt(targets, index + 1)

            # maybeDeferred: building the target's endpoint reads its TLS
            # files, and a bad one fails this target, not the whole attempt.
            step[0] = defer.maybeDeferred(
                lambda: self._target_endpoint(host, port).connect(protocol_factory))
            step[0].addCallbacks(connected, failed)

        def looked_up(targets):
            step[0] = None
            if not cancelled:
                attempt(targets, 0)

        def lookup_failed(failure):
            step[0] = None
            if not cancelled:
                outcome.errback(failure)

        step[0] = self.targets()
        step[0].addCallbacks(looked_up, lookup_failed)
        return outcome


def default_dns_resolver():
    """The system's DNS (C{/etc/resolv.conf}, with a cache), made when first needed."""
    from twisted.names import client
    return client.createResolver()


def configured_gateways(client):
    """The keys of the gateways C{client} configures: C{host:port} ones, then SRV ones."""
    return tuple(client.gateway_addrs) + tuple(srv_key(name) for name in client.gateway_srv)
