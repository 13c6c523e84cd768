# The twistd dropins: `twistd anyproxy-gateway` and `twistd anyproxy-client`.
# No __init__.py in twisted/ or twisted/plugins/: Twisted finds this file by path.
from twisted.application.service import ServiceMaker

anyproxy_gateway = ServiceMaker(
    "AnyProxy gateway", "anyproxy.twistd.gateway",
    "AnyProxy gateway: HTTP/SOCKS5 proxies for users, WebSocket+TLS server for clients",
    "anyproxy-gateway")

anyproxy_client = ServiceMaker(
    "AnyProxy client", "anyproxy.twistd.client",
    "AnyProxy client: dials out to the gateway and reaches targets in its network",
    "anyproxy-client")
