# -*- test-case-name: tests.test_frontend_plugins -*-
"""
The two built-in frontends as plugins: C{socks5} and C{http}.

C{proxy.socks5} and C{proxy.http} in the config are served by these, exactly
as a C{proxy.frontends} entry of the same type would be.  The factories are
imported when a listener is built, not when plugins are listed.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from anyproxy.interfaces import IFrontendFactory, OptionError, reject_unknown_options


@implementer(IPlugin, IFrontendFactory)
class Socks5Frontend:
    """SOCKS5 (CONNECT, UDP ASSOCIATE) with RFC 1929 username/password auth."""

    name = "socks5"
    description = "SOCKS5 proxy: CONNECT and UDP ASSOCIATE, username/password auth"
    authenticates = True

    def check_options(self, options):
        reject_unknown_options(options, ())

    def build(self, options, context):
        from anyproxy.frontends.socks5.protocol import Socks5Factory
        return Socks5Factory(context.users, context.endpoint_for, context.reactor,
                             handshake_timeout=context.handshake_timeout, name=context.name)


@implementer(IPlugin, IFrontendFactory)
class HttpFrontend:
    """The HTTP proxy (CONNECT and absolute-URI requests) with Basic auth."""

    name = "http"
    description = "HTTP proxy: CONNECT and absolute-URI requests, Basic auth"
    authenticates = True

    def check_options(self, options):
        reject_unknown_options(options, ("realm", "upstream_keepalive", "upstream_idle_timeout"))
        realm = options.get("realm", "anyproxy")
        if not (isinstance(realm, str) and realm and realm.isascii() and realm.isprintable()):
            raise OptionError("realm", "expected a non-empty printable ASCII string")
        keepalive = options.get("upstream_keepalive", 0)
        if type(keepalive) is not int or keepalive < 0:
            raise OptionError("upstream_keepalive", "expected a whole number >= 0 (0 = off)")
        timeout = options.get("upstream_idle_timeout", 1)
        if type(timeout) not in (int, float) or not timeout > 0:
            raise OptionError("upstream_idle_timeout", "expected a number of seconds > 0")

    def build(self, options, context):
        from anyproxy.frontends.http.proxy import HttpProxyFactory
        from anyproxy.frontends.http.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IDLE
        return HttpProxyFactory(
            context.users, context.endpoint_for, context.reactor,
            handshake_timeout=context.handshake_timeout, realm=options.get("realm", "anyproxy"),
            upstream_keepalive=options.get("upstream_keepalive", DEFAULT_MAX_IDLE),
            upstream_idle_timeout=options.get("upstream_idle_timeout", DEFAULT_IDLE_TIMEOUT),
            name=context.name)


socks5 = Socks5Frontend()
http = HttpFrontend()
