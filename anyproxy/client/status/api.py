# -*- test-case-name: tests.test_client_status -*-
"""
The client's status page (C{client.status_addr}): the tunnels to each
gateway (state, RTT, since when, streams), the recent refusals by access
control with the rule that refused each, and the forwarded ports.  C{/} is
a static page (L{anyproxy.client.status.page}) polling C{/api/status}
(JSON) once a second.

As the gateway's page (L{anyproxy.gateway.status.api}), it is an
L{anyproxy.operator_site.OperatorSite}: one Basic login compared in
constant time (required: the page shows which internal targets were asked
for), a deadline per request, a cap on connections, no access log.  The
loader wants the login whatever the address; C{127.0.0.1} is what the
examples use.  Every request takes a fresh snapshot: nothing here keeps
state but the refusal ring (L{anyproxy.client.status.refusals}).
"""


from twisted.web import resource

from anyproxy import __version__
from anyproxy.client.status.page import CONTENT_SECURITY_POLICY, PAGE
from anyproxy.client.status.refusals import RefusalLog
from anyproxy.client.status.tunnels import open_ports_snapshot, tunnel_snapshot
from anyproxy.listeners import Listener
from anyproxy.operator_site import JSONSnapshot, OperatorSite, PageResource

REALM = "AnyProxy client status"
MAX_CONNECTIONS = 32  # a few browsers (about 6 each) and scripts


def client_snapshot(root, refusals, started_at, now):
    """What C{/api/status} answers, for C{root} (a L{anyproxy.client.app.ClientRoot})."""
    client = root.config.client
    dialer = root.dialer
    return {
        "client": {"software": "anyproxy/" + __version__, "client_id": client.client_id,
                   "group": client.group_id, "started_at": started_at,
                   "uptime": max(0.0, now - started_at), "now": now,
                   "active_streams": dialer.active,
                   "acl_refusals": dialer.acl_refusals},
        "tunnels": tunnel_snapshot(root, now),
        "refusals": list(reversed(refusals.entries())),  # newest first
        "open_ports": open_ports_snapshot(root),
    }


def status_site(root, refusals, reactor, username, password):
    """The status page's L{OperatorSite}: C{/} and C{/api/status} behind the login."""
    started_at = reactor.seconds()
    tree = resource.Resource()
    tree.putChild(b"", PageResource(PAGE, CONTENT_SECURITY_POLICY))
    api = resource.Resource()
    api.putChild(b"status", JSONSnapshot(
        lambda: client_snapshot(root, refusals, started_at, reactor.seconds())))
    tree.putChild(b"api", api)
    return OperatorSite(tree, reactor, "client status page", REALM,
                        request_timeout=root.config.client.connect_timeout,
                        max_connections=MAX_CONNECTIONS, username=username, password=password)


def add_status_page(root, reactor, client, logins):
    """
    Keep the refusal ring on C{root.dialer} and, when C{client.status_addr}
    is set, serve the page there (C{root.status_listener}), its logins
    checked and throttled by C{logins} (L{anyproxy.auth.Logins}); a reload
    changes its login and request deadline for the next request.
    """
    refusals = root.refusals = RefusalLog(reactor)
    root.dialer.refusal_log = refusals
    if client.status_endpoint is None:
        return
    site = status_site(root, refusals, reactor, client.status_username, client.status_password)
    site.use_logins(logins)
    root.status_listener = Listener(reactor, client.status_endpoint, site, "status page")
    root.status_listener.setServiceParent(root)

    def new_login(config):
        if config.client.status_endpoint is not None:  # else it stops at the restart
            site.set_login(config.client.status_username, config.client.status_password)
            site.request_timeout = config.client.connect_timeout

    root.reload_hooks.append(new_login)
