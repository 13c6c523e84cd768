"""
Why a stream could not be opened, and what each frontend tells the user.

One table maps a L{Reason} to a SOCKS5 reply code, an
HTTP status and the text users see (L{user_text}); frontends never invent their
own mapping.  The numeric values of
L{Reason} are the reason codes carried in OPEN_ERROR frames (docs/PROTOCOL.md),
so they are part of the wire format: add values, never renumber.
"""

import enum
import errno
import socket

from twisted.internet import defer, error


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


# Reason -> what users are told (the body of an HTTP error answer): the row of
# the error table, nothing more.  A StreamOpenError's detail can carry an OS
# error from the client ("111: Connection refused", "[Errno -2] Name or
# service not known"), host names or the name of a limit: it goes to the
# gateway's log, never to users.
_USER_TEXT = {
    Reason.GENERAL_FAILURE: "general failure",
    Reason.NOT_ALLOWED: "target not allowed",
    Reason.PROTOCOL_NOT_ALLOWED: "protocol not allowed",
    Reason.NETWORK_UNREACHABLE: "network unreachable",
    Reason.HOST_UNREACHABLE: "host unreachable",
    Reason.NAME_NOT_RESOLVED: "name not resolved",
    Reason.CONNECTION_REFUSED: "connection refused",
    Reason.TIMED_OUT: "connect timed out",
    Reason.NO_TUNNEL: "no tunnel available",
    Reason.OVERLOADED: "too many connections, try again later",
}


def user_text(reason):
    """The generic text users are shown for C{reason} (a L{Reason} or wire code)."""
    return _USER_TEXT.get(coerce_reason(reason), _USER_TEXT[Reason.GENERAL_FAILURE])


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
    @ivar detail: a short human-readable explanation for logs (never contains
        credentials).  It may quote an OS error or the peer's OPEN_ERROR
        text, so users are shown L{user_text} of the reason instead.
    """

    def __init__(self, reason, detail=""):
        self.reason = coerce_reason(reason)
        self.detail = detail or self.reason.name.lower().replace("_", " ")
        super().__init__(self.reason, self.detail)

    def __str__(self):
        return "%s: %s" % (self.reason.name, self.detail)

    @property
    def user_text(self):
        """What users are told: the reason's generic text (L{user_text})."""
        return user_text(self.reason)


class ConfigError(Exception):
    """
    The configuration is invalid.  The message names the file and key path,
    in one line, e.g. C{etc/anyproxy.yaml: client.limit[0].addr: bad port 'x'}.
    """


class HelloRefused(Exception):
    """
    A tunnel's HELLO the gateway will not register: the tunnel is closed with
    C{code} (one of L{anyproxy.tunnel.frames}' C{CLOSE_*} codes) and
    C{reason}, which both sides log.
    """

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def reason_for_failure(failure):
    """The L{Reason} a failed resolve/connect maps to."""
    exc = failure.value
    if isinstance(exc, StreamOpenError):
        return exc.reason
    if isinstance(exc, error.ConnectionRefusedError):
        return Reason.CONNECTION_REFUSED
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError, defer.TimeoutError,
                        defer.CancelledError)):
        return Reason.TIMED_OUT
    if isinstance(exc, error.DNSLookupError):
        return Reason.NAME_NOT_RESOLVED
    if isinstance(exc, socket.gaierror):
        return Reason.HOST_UNREACHABLE  # an IPv6 literal's zone that names no interface
    # Before NoRouteError: Twisted raises NoRouteError for ENETUNREACH too.
    os_error = getattr(exc, "osError", None)
    if os_error == errno.ENETUNREACH:
        return Reason.NETWORK_UNREACHABLE
    if os_error in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return Reason.HOST_UNREACHABLE
    if isinstance(exc, error.NoRouteError):
        return Reason.HOST_UNREACHABLE
    return Reason.GENERAL_FAILURE
