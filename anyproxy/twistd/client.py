"""C{twistd anyproxy-client}: see L{anyproxy.client.app}."""

from anyproxy.twistd.options import ConfigOptions


class Options(ConfigOptions):
    role = "client"
    synopsis = "[--config=etc/anyproxy.yaml]"
    longdesc = ("Run the AnyProxy client: connect out to the gateway(s) and carry "
                "users' streams to the targets this network may reach.")


def makeService(options):
    from twisted.internet import reactor

    from anyproxy.client.app import make_client_service
    from anyproxy.twistd.options import built, logging_root

    service, _ = built(options, lambda: make_client_service(options["loaded"], reactor))
    return logging_root(service, options)
