"""
Named markers for sans-I/O state machines (h11's idiom): states and the
"need more bytes" / "paused" answers of the SOCKS5 and HTTP/1.1 parsers.
"""


class _SentinelType(type):
    def __repr__(cls):
        return cls.__name__


def sentinel(name):
    """A unique marker, compared with C{is}, whose repr is C{name}."""
    return _SentinelType(name, (), {})
