# -*- test-case-name: tests.test_fleet_registry -*-
"""
C{gateway.fleet.redis}: a C{redis[s]://} URL read into a L{RedisTarget},
checked when the config loads and used by the fleet registry
(L{anyproxy.fleet.registry}).  No error message quotes a part of the URL
but its scheme: an unencoded password may have split it anywhere.
"""

import urllib.parse

import attr

from anyproxy.addresses import host_port

DEFAULT_PORT = 6379


@attr.s(frozen=True)
class RedisTarget:
    """
    Where Redis is and how to log in, from a C{redis://} or C{rediss://} URL.

    @ivar display: the URL without its password, for logs.
    """

    host = attr.ib()
    port = attr.ib()
    db = attr.ib()
    username = attr.ib(repr=False)
    password = attr.ib(repr=False)
    tls = attr.ib()
    ca_certs = attr.ib(default=None)
    certfile = attr.ib(default=None)
    keyfile = attr.ib(default=None)
    display = attr.ib(default="")


def parse_redis_url(url):
    """
    Parse C{redis[s]://[[user]:password@]host[:port][/db][?options]}.

    Options (as redis-py names them): C{db}, and for C{rediss://}
    C{ssl_ca_certs} (a PEM file of CAs to trust instead of the system's),
    C{ssl_certfile} and C{ssl_keyfile} (a client certificate).

    @raise ValueError: with a message that never contains the password.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        # Not urllib's message: it quotes the "port", which is part of the
        # password when that holds a "/", "?" or "#".
        raise ValueError("bad Redis URL: not redis[s]://[[user]:password@]host[:port][/db] "
                         "(percent-encode a \"/\", \"?\", \"#\" or \"@\" in the password)") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("a Redis URL starts with redis:// or rediss://, not %r"
                         % (parts.scheme + ":",))
    if "#" in url:
        # A URL to Redis has no fragment: an unencoded "#" in the password
        # starts one, and what is left of the password would pass for the host.
        raise ValueError("bad Redis URL: a \"#\" (percent-encode it as %23 in the password)")
    host = parts.hostname
    if not host:
        raise ValueError("the Redis URL names no host (redis://HOST:PORT/DB)")
    options = {}
    for name, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if name not in ("db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            # Not the name: a "?" in an unencoded password starts the query.
            raise ValueError("an unknown Redis URL option (known: db, ssl_ca_certs, "
                             "ssl_certfile, ssl_keyfile; percent-encode a \"?\" in the password)")
        options[name] = values[-1]
    db_text = parts.path.strip("/") or options.get("db", "0")
    if not db_text.isdigit():
        # Not the value: a "/" in an unencoded password starts the path.
        raise ValueError("the Redis database (the URL's path, or db=) must be a number "
                         "(percent-encode a \"/\" in the password)")
    tls = parts.scheme == "rediss"
    if not tls and any(name.startswith("ssl_") for name in options):
        raise ValueError("ssl_* options need a rediss:// URL")
    if bool(options.get("ssl_certfile")) != bool(options.get("ssl_keyfile")):
        raise ValueError("ssl_certfile and ssl_keyfile go together")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is None and username is not None:
        # redis://secret@host: redis-py and Redis's own docs read it as the password.
        username, password = None, username
    port = port if port is not None else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError("bad Redis port %d" % (port,))
    display = "%s://%s/%s" % (parts.scheme, host_port(host, port), db_text)
    return RedisTarget(host=host, port=port, db=int(db_text), username=username or None,
                       password=password or None, tls=tls,
                       ca_certs=options.get("ssl_ca_certs") or None,
                       certfile=options.get("ssl_certfile") or None,
                       keyfile=options.get("ssl_keyfile") or None, display=display)
