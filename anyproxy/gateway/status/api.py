# -*- test-case-name: tests.test_e2e_status -*-
"""
The gateway's status page (C{gateway.status_addr}): who is connected and how
busy they are, for an operator's browser (C{/}) and for scripts
(C{/api/status}, JSON), and the management API
(L{anyproxy.gateway.status.management}, C{docs/MANAGEMENT_API.md}).  All are
behind HTTP Basic auth with
C{gateway.status_username}/C{gateway.status_password}.

Theory of operation
-------------------
Nothing here keeps state of its own: every request takes a fresh snapshot of
the L{TunnelPool} (L{status_snapshot}).  The HTML page is static and
self-contained (L{anyproxy.gateway.status.page}); its inline script polls the
JSON API once a second and rewrites the DOM, so the page never holds data the
API does not also give.

The site is an L{anyproxy.operator_site.OperatorSite}, as the C{/metrics}
pages are: Basic auth through C{twisted.web.guard} with one login compared in
constant time (a wrong or missing one gets C{401} with C{WWW-Authenticate:
Basic}; the password never reaches a log event), a deadline for each request
(C{gateway.handshake_timeout}) instead of an idle timeout, at most
L{MAX_CONNECTIONS} open connections, and no access log (the page polls every
second, which would fill it).

Traffic counters are read defensively: a tunnel (or its mux) that has no byte
or stream counters reports C{null} for them, and the page shows "n/a".  The
traffic totals run since the gateway started: L{TrafficHistory} adds up the
counters of each tunnel as the pool lets it go.

In a fleet (C{gateway.fleet}) the answer has a C{fleet} key
(L{anyproxy.fleet.node.FleetNode.status}): this node's id, every node with
the groups it holds, its load and whether it drains, the registry's health,
relayed streams and the forwarded ports this node holds.  Without a fleet
the key is absent.  It too comes from the fleet's cached view and counters,
never a round trip to the registry.
"""

import json
import time

from twisted.web import resource

from anyproxy import __version__
from anyproxy.gateway.status.page import CONTENT_SECURITY_POLICY, PAGE
from anyproxy.operator_site import (
    DEFAULT_REQUEST_TIMEOUT, OperatorSite, PageResource, set_operator_headers)

REALM = "AnyProxy status"
# Open connections at most: a browser opens about 6, a few operators and
# scripts fit; the rest get 503 rather than the proxy's file descriptors.
MAX_CONNECTIONS = 64

# Counter attributes looked up on a Tunnel, then on its Mux, first match wins.
# "in" is what the gateway received over the tunnel from the client (the
# targets' answers), "out" what it sent to the client (the users' requests).
BYTES_IN_NAMES = ("bytes_in", "bytes_received")
BYTES_OUT_NAMES = ("bytes_out", "bytes_sent")
STREAMS_OPENED_NAMES = ("streams_opened", "opened_streams", "streams_total")
COUNTERS = {"streams_opened": STREAMS_OPENED_NAMES, "bytes_in": BYTES_IN_NAMES,
            "bytes_out": BYTES_OUT_NAMES}



def _counter(tunnel, names):
    """The first integer counter of C{names} on C{tunnel} or its mux, or C{None}."""
    for owner in (tunnel, getattr(tunnel, "mux", None)):
        for name in names:
            value = getattr(owner, name, None)
            if callable(value):
                value = value()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value)
    return None


def _sum(values):
    """The sum of the known values, or C{None} if none is known."""
    known = [each for each in values if each is not None]
    return sum(known) if known else None


class TrafficHistory:
    """
    The traffic counters of tunnels that have gone, so that totals run since
    the gateway started rather than over the tunnels connected now.

    @ivar since_start: C{False} if the pool cannot report removed
        tunnels (then the totals cover connected tunnels only).
    """

    def __init__(self, tunnel_pool):
        self.retired = dict.fromkeys(COUNTERS)
        observers = getattr(tunnel_pool, "removal_observers", None)
        self.since_start = observers is not None
        if observers is not None:
            observers.append(self.tunnel_removed)

    def tunnel_removed(self, tunnel):
        for key, names in COUNTERS.items():
            value = _counter(tunnel, names)
            if value is not None:
                self.retired[key] = (self.retired[key] or 0) + value


def tunnel_status(tunnel, now):
    """One connected tunnel as a JSON-able dict."""
    return {
        "client_id": tunnel.client_id,
        "group": tunnel.group,
        "credential": tunnel.credential,
        "address": str(tunnel.address),
        "version": str(tunnel.version),
        "weight": tunnel.weight,
        "routes": list(getattr(tunnel, "route_texts", ())),  # client.routes; [] = anything
        "connected_at": tunnel.connected_at,
        "connected_for": max(0.0, now - tunnel.connected_at),
        "active_streams": tunnel.active_streams,
        "draining": bool(getattr(tunnel, "draining", False)),
        "streams_opened": _counter(tunnel, STREAMS_OPENED_NAMES),
        "bytes_in": _counter(tunnel, BYTES_IN_NAMES),
        "bytes_out": _counter(tunnel, BYTES_OUT_NAMES),
    }


def status_snapshot(tunnel_pool, started_at, now, history=None, fleet=None):
    """
    What C{/api/status} answers: the gateway, live totals and one entry per
    connected tunnel (oldest first).  C{tunnels}, C{clients}, C{groups} and
    C{active_streams} are now; the traffic totals are since the start when
    C{totals.since_start} is true, else over the connected tunnels.

    @param tunnel_pool: the gateway's L{anyproxy.interfaces.ITunnelPool}.
    @param started_at: when the gateway started (seconds since the epoch).
    @param now: the current time (seconds since the epoch).
    @param history: the L{TrafficHistory} of tunnels gone, or C{None}.
    @param fleet: C{fleet()} -> the C{fleet} value (a dict), or C{None}
        without a fleet (then the key is absent).
    """
    tunnels = sorted(tunnel_pool.tunnels(), key=lambda t: (t.connected_at, t.client_id))
    clients = [tunnel_status(t, now) for t in tunnels]
    totals = {
        "tunnels": len(clients),
        "clients": len({c["client_id"] for c in clients}),
        "groups": len({c["group"] for c in clients}),
        "active_streams": sum(c["active_streams"] for c in clients),
    }
    for key in COUNTERS:
        retired = history.retired[key] if history is not None else None
        totals[key] = _sum([retired] + [c[key] for c in clients])
    totals["since_start"] = history is not None and history.since_start
    snapshot = {
        "gateway": {"software": "anyproxy/" + __version__, "started_at": started_at,
                    "uptime": max(0.0, now - started_at), "now": now},
        "totals": totals,
        "clients": clients,
    }
    fleet_status = fleet() if fleet is not None else None
    if fleet_status is not None:
        snapshot["fleet"] = fleet_status
    return snapshot


class StatusAPI(resource.Resource):
    """C{GET /api/status}: L{status_snapshot} as JSON."""

    isLeaf = True

    def __init__(self, tunnel_pool, started_at, now, fleet=None):
        super().__init__()
        self._tunnel_pool = tunnel_pool
        self._started_at = started_at
        self._now = now
        self._history = TrafficHistory(tunnel_pool)
        self._fleet = fleet

    def snapshot(self):
        """The answer, as a dict."""
        return status_snapshot(self._tunnel_pool, self._started_at, self._now(), self._history,
                               fleet=self._fleet)

    def render_GET(self, request):
        set_operator_headers(request, b"application/json; charset=utf-8")
        return json.dumps(self.snapshot(), sort_keys=True).encode("utf-8")


def fleet_of(management):
    """
    C{fleet()} for L{status_snapshot}: the fleet status of the gateway
    C{management} serves (L{anyproxy.fleet.node.FleetNode.status}), or
    C{None} while it is in no fleet.
    """
    def fleet():
        gateway = management.gateway
        node = getattr(gateway, "fleet", None)
        if node is None:
            return None
        return node.status(draining=getattr(gateway, "draining", None) is not None)
    return fleet


def status_tree(tunnel_pool, started_at=None, now=time.time, management=None, fleet=None):
    """
    The unauthenticated resource tree: C{/} and C{/api/status}, and with
    C{management} (a L{anyproxy.gateway.status.management.Management}) the
    whole management API under C{/api/}.

    @param fleet: C{fleet()} -> the fleet status (see L{status_snapshot});
        by default, with C{management}, its gateway's (L{fleet_of}).
    """
    root = resource.Resource()
    root.putChild(b"", PageResource(PAGE, CONTENT_SECURITY_POLICY))
    if fleet is None and management is not None:
        fleet = fleet_of(management)
    status = StatusAPI(tunnel_pool, now() if started_at is None else started_at, now, fleet)
    if management is not None:
        # Browser profiles from the routes clients announce (status/profiles.py),
        # under the config in force (a reload changes them).
        from anyproxy.gateway.status.profiles import ProxyProfiles, add_profiles
        management.profiles = ProxyProfiles(tunnel_pool, lambda: management.gateway.config,
                                            lambda: management.gateway.listeners)
        add_profiles(root, management.profiles)
    if management is not None:
        from anyproxy.gateway.status.management import ManagementAPI
        root.putChild(b"api", ManagementAPI(management, status.snapshot, tunnel_status))
        return root
    api = resource.Resource()
    api.putChild(b"status", status)
    root.putChild(b"api", api)
    return root


def status_site(tunnel_pool, username, password, started_at=None, now=time.time, reactor=None,
                request_timeout=DEFAULT_REQUEST_TIMEOUT, max_connections=MAX_CONNECTIONS,
                management=None):
    """
    The status page's C{Site}: L{status_tree} behind Basic auth, with the
    request deadline and connection cap of every L{OperatorSite}.

    @param tunnel_pool: the gateway's tunnel pool.
    @param username: the one login (C{gateway.status_username}).
    @param password: its password (C{gateway.status_password}).
    @param reactor: for timers (C{None}: the global reactor).
    @param request_timeout: seconds a request head may take
        (C{gateway.handshake_timeout}).
    @param max_connections: open connections at most; more get 503.
    @param management: the gateway's
        L{anyproxy.gateway.status.management.Management}, to serve the
        management API; C{None}: C{/api/status} only.
    @return: the L{OperatorSite}; its C{checker} (L{SingleUserChecker})
        takes new credentials on reload.
    """
    if not username or not password:
        raise ValueError("the status page needs a username and a password")
    site = OperatorSite(status_tree(tunnel_pool, started_at, now, management), reactor,
                        "status page", REALM,
                        request_timeout=request_timeout, max_connections=max_connections,
                        username=username, password=password)
    if management is not None and management.profiles is not None:
        from anyproxy.gateway.status.profiles import add_capabilities
        add_capabilities(site, management.profiles)
    return site
