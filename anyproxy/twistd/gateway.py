"""C{twistd anyproxy-gateway}: see L{anyproxy.gateway.app}."""

from anyproxy.twistd.options import ConfigOptions


class Options(ConfigOptions):
    role = "gateway"
    synopsis = "[--config=etc/anyproxy.yaml]"
    longdesc = ("Run the AnyProxy gateway: the HTTP/SOCKS5 proxies for users and the "
                "WebSocket+TLS server that clients connect to.")


def makeService(options):
    from twisted.internet import reactor

    from anyproxy.gateway.app import make_gateway_service
    from anyproxy.twistd.options import logging_root

    return logging_root(make_gateway_service(options["loaded"], reactor), options)
