"""C{twistd anyproxy-client}: see L{anyproxy.client.service}."""

from anyproxy.tap import ConfigOptions


class Options(ConfigOptions):
    role = "client"
    synopsis = "[--config=etc/anyproxy.yaml]"
    longdesc = ("Run the AnyProxy client: connect out to the gateway(s) and carry "
                "users' streams to the targets this network may reach.")


def makeService(options):
    from twisted.internet import reactor

    from anyproxy.client.service import make_client_service
    from anyproxy.tap import logging_root

    service, _ = make_client_service(options["loaded"], reactor)
    return logging_root(service, options)
