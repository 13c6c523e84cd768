"""
Why a stream could not be opened, and what each frontend tells the user.

One table (DESIGN.md section 5) maps a L{Reason} to a SOCKS5 reply code and an
HTTP status; frontends never invent their own mapping.  The numeric values of
L{Reason} are the reason codes carried in OPEN_ERROR frames (docs/PROTOCOL.md),
so they are part of the wire format: add values, never renumber.
"""

import enum


class Reason(enum.IntEnum):
    """Why opening a stream failed.  Values are wire codes."""

    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TIMED_OUT = 0x06
    NAME_NOT_RESOLVED = 0x10
    NO_TUNNEL = 0x11
    OVERLOADED = 0x12
    PROTOCOL_NOT_ALLOWED = 0x13


# Reason -> (SOCKS5 REP code, HTTP status)
_USER_FACING = {
    Reason.GENERAL_FAILURE: (0x01, 502),
    Reason.NOT_ALLOWED: (0x02, 403),
    Reason.PROTOCOL_NOT_ALLOWED: (0x02, 403),
    Reason.NETWORK_UNREACHABLE: (0x03, 502),
    Reason.HOST_UNREACHABLE: (0x04, 502),
    Reason.NAME_NOT_RESOLVED: (0x04, 502),
    Reason.CONNECTION_REFUSED: (0x05, 502),
    Reason.TIMED_OUT: (0x06, 504),
    Reason.NO_TUNNEL: (0x01, 503),
    Reason.OVERLOADED: (0x01, 503),
}


def socks_reply_code(reason):
    """The SOCKS5 REP byte for C{reason}."""
    return _USER_FACING.get(reason, (0x01, 502))[0]


def http_status(reason):
    """The HTTP status code the HTTP proxy answers for C{reason}."""
    return _USER_FACING.get(reason, (0x01, 502))[1]


def coerce_reason(code):
    """A L{Reason} for a wire code; unknown codes become GENERAL_FAILURE."""
    try:
        return Reason(code)
    except ValueError:
        return Reason.GENERAL_FAILURE


class StreamOpenError(Exception):
    """
    A stream could not be opened.

    @ivar reason: a L{Reason}.
    @ivar detail: a short human-readable explanation, safe to log and to show
        to the user (never contains credentials).
    """

    def __init__(self, reason, detail=""):
        self.reason = coerce_reason(reason)
        self.detail = detail or self.reason.name.lower().replace("_", " ")
        super().__init__(self.reason, self.detail)

    def __str__(self):
        return "%s: %s" % (self.reason.name, self.detail)


class ConfigError(Exception):
    """
    The configuration is invalid.  The message names the file and key path,
    in one line, e.g. C{etc/anyproxy.yaml: client.limit[0].addr: bad port 'x'}.
    """
