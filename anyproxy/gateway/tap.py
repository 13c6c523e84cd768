"""C{twistd anyproxy-gateway}: see L{anyproxy.gateway.service}."""

from anyproxy.tap import ConfigOptions


class Options(ConfigOptions):
    role = "gateway"
    synopsis = "[--config=etc/anyproxy.yaml]"
    longdesc = ("Run the AnyProxy gateway: the HTTP/SOCKS5 proxies for users and the "
                "WebSocket+TLS server that clients connect to.")


def makeService(options):
    from twisted.internet import reactor

    from anyproxy.gateway.service import make_gateway_service
    from anyproxy.tap import logging_root

    return logging_root(make_gateway_service(options["loaded"], reactor), options)
