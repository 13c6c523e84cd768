# -*- test-case-name: tests.test_logs -*-
"""
Log setup for the twistd programs: the configured level and format, on the
destination twistd was given.

twistd builds its log observer before our services start, but it first asks
the application for an C{ILogObserver} component; L{LoggingRoot} registers one
when twistd attaches our service tree to the application.  The observer
filters by C{log.level}, writes text or JSON lines (C{log.format}) to
C{log.file}, or else where twistd would have written (its C{--logfile},
stdout with C{-n}, C{twistd.log} for a daemon).  Autobahn logs through txaio,
which gets the same level so that debug messages are not even formatted on
the data path.  A log file is rotated at C{log.max_size} MB and keeps
C{log.max_backups} rotated files.

Secrets never reach a destination: what Autobahn's tunnel protocols log is
masked as each event is made (L{library_logger}: its debug lines dump the
opening handshake, the client's C{Authorization} header included), so every
observer, twistd's own too, receives it clean; and our observer masks every
event again (L{RedactingObserver}) before writing it.
"""

import re
import sys

import txaio
from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver, ILogObserver, Logger, LogLevel, LogLevelFilterPredicate,
    jsonFileLogObserver, textFileLogObserver)
from twisted.python.logfile import LogFile
from txaio import tx as _txaio_twisted
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


_SECRET_KEY = re.compile(r"passw(or)?d|secret|token|authorization|cookie", re.I)
REDACTED = "<redacted>"
_SCHEMES = r"basic|bearer|digest|negotiate|ntlm"
# A credential header and its value, to the end of its line: in raw HTTP,
# in a repr (b'...\r\nAuthorization: Basic ...\r\n...', where the line ends
# at a literal backslash-r), or in a dict or JSON rendering
# ({'authorization': 'Basic ...'}, where it ends at the quote).  The
# scheme is kept for diagnosis.
_HEADER = (r"(?P<head>\b(?:proxy[-_]?)?authorization|\b(?:set[-_]?)?cookie)"
           r"(?P<sep>['\"]?\s*[:=]\s*(?:[bu]?['\"])?)"
           r"(?P<scheme>(?:" + _SCHEMES + r") +)?"
           r"(?:[^\r\n'\"\\]|\\(?![rn'\"\\]))+")
# A credential anywhere else: "Basic dXNlcjpwdw==".
_SCHEME_TOKEN = r"\b(?P<scheme>" + _SCHEMES + r")\s+[A-Za-z0-9+/=._~-]{4,}"
_TEXT = [(re.compile(_HEADER, re.I), r"\g<head>\g<sep>\g<scheme>" + REDACTED),
         (re.compile(_SCHEME_TOKEN, re.I), r"\g<scheme> " + REDACTED)]
_BYTES = [(re.compile(pattern.pattern.encode("ascii"), re.I), replacement.encode("ascii"))
          for pattern, replacement in _TEXT]
_PLAIN = (int, float, type(None), LogLevel)
_MAX_DEPTH = 8


def _scrub_text(text):
    for pattern, replacement in _TEXT:
        text = pattern.sub(replacement, text)
    return text


def _scrub_bytes(data):
    for pattern, replacement in _BYTES:
        data = pattern.sub(replacement, data)
    return data


def _secret_name(name):
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).decode("latin-1")
    return isinstance(name, str) and _SECRET_KEY.search(name) is not None


def _scrub(value, depth=0):
    """C{value} with every credential in it masked; C{value} itself if it held none."""
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _scrub_bytes(bytes(value))
    if isinstance(value, _PLAIN):
        return value
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            # Header dicts: {"authorization": "Basic ..."}, keys str or bytes.
            return {key: REDACTED if _secret_name(key) else _scrub(item, depth + 1)
                    for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            if (isinstance(value, (list, tuple)) and len(value) == 2
                    and _secret_name(value[0])):
                return type(value)((value[0], REDACTED))  # a header pair
            items = [_scrub(item, depth + 1) for item in value]
            return value if items == list(value) else (
                type(value)(items) if type(value) in (list, tuple, set, frozenset) else items)
        # Autobahn's ConnectionRequest / ConnectingRequest / ConnectionResponse
        # render their headers (a client's include Authorization).
        as_json = getattr(type(value), "__json__", None)
        if as_json is not None:
            try:
                data = value.__json__()
            except Exception:
                data = None
            if isinstance(data, dict):
                clean = _scrub(data, depth + 1)
                return value if clean == data else clean
    # Anything else is judged by its text, which is what observers write.
    try:
        text = str(value)
    except Exception:
        return value
    clean = _scrub_text(text)
    return value if clean == text else clean


def redact_fields(fields):
    """
    A copy of C{fields} (an event, or the keyword arguments of one) with
    every credential masked.  Fields whose name says they hold a secret
    (C{password}, C{authorization}, C{cookie}, C{token}...) become
    C{<redacted>}; in every other value, of any type (text, bytes, header
    dicts and lists, Autobahn's request objects, anything whose text
    shows one), the values of C{Authorization}, C{Proxy-Authorization},
    C{Cookie} and C{Set-Cookie} headers and C{Basic}/C{Bearer}/...
    credentials are masked.  Twisted's own C{log_*} fields are kept, but
    for their text (C{log_format}, C{log_text}...).
    """
    clean = {}
    for key, value in fields.items():
        if key.startswith("log_"):
            if isinstance(value, str):
                value = _scrub_text(value)
            elif key == "log_flattened":
                value = _scrub(value)
        elif _SECRET_KEY.search(key):
            value = REDACTED
        else:
            value = _scrub(value)
        clean[key] = value
    return clean


def redact(event):
    """
    A copy of a log event with secrets masked (L{redact_fields}).  Our
    code never logs secrets and Autobahn's protocols log through
    L{library_logger}; this is the second line, at the destination.
    """
    return redact_fields(event)


class RedactingLogger(Logger):
    """
    A C{twisted.logger.Logger} that masks credentials (L{redact_fields}) in
    the format and fields of every event before it exists: no observer,
    whoever installed it, ever receives the secret.
    """

    def emit(self, level, format=None, **kwargs):
        if isinstance(format, str):
            format = _scrub_text(format)
        super().emit(level, format, **redact_fields(kwargs))


def library_logger(namespace):
    """
    A logger for a library that logs through txaio (Autobahn), for a class
    attribute C{log} of our subclasses of its classes, so that what the
    library logs is redacted at the source.

    Why at the source: at debug, Autobahn's WebSocket protocols dump the
    opening handshake, C{Authorization: Basic ...} included: the gateway
    C{"received HTTP request:\\n\\n{data}"} with the raw request as
    I{bytes}, the client C{"sent HTTP request:\\n{request}"} as text, and
    header dicts and request objects in other lines.  A redacting observer
    only protects the destinations it wraps; this event is published to
    every observer of the global publisher (twistd's own log file,
    syslog or C{--logger} when the config names no C{log.file}; the
    beginner's buffer of early events; anything a plugin adds).  Masking
    the fields as the event is made protects all of them, at every level.

    The logger is txaio's own kind (a C{txaio.tx.Logger} around
    L{RedactingLogger}), so it follows C{txaio.set_global_log_level} and
    its methods below the level stay no-ops: nothing is formatted or
    redacted on the data path unless debug is on.
    """
    return _txaio_twisted.Logger(namespace=namespace, logger=RedactingLogger)


@implementer(ILogObserver)
class RedactingObserver:
    """Passes redacted copies of events on to C{observer}."""

    def __init__(self, observer):
        self._observer = observer

    def __call__(self, event):
        self._observer(redact(event))


_MB = 1024 * 1024


def _open(path, nodaemon, log_config):
    if path == "-" or (not path and nodaemon):
        return sys.stdout
    # Rotated at log.max_size; a rotation deletes the files numbered
    # log.max_backups and above (path.1 is the newest), so at most that many
    # are kept, whatever an earlier run left (max_backups 0: all are kept).
    return LogFile.fromFullPath(path or "twistd.log", rotateLength=log_config.max_size * _MB,
                                maxRotatedFiles=log_config.max_backups or None)


def make_observer(log_config, twistd_logfile=None, nodaemon=True):
    """
    The observer for a L{anyproxy.config.model.LogConfig}.

    @param twistd_logfile: twistd's C{--logfile} value, used when the config
        names no file.
    """
    stream = _open(log_config.file or twistd_logfile, nodaemon, log_config)
    if log_config.format == "json":
        observer = jsonFileLogObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    level = LEVELS[log_config.level]
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    filtering = FilteringLogObserver(RedactingObserver(observer), [predicate])
    filtering.level_predicate = predicate  # for set_log_level (reload)
    filtering.stream = stream  # the destination (tests close it)
    return filtering


def set_log_level(observer, level):
    """
    Change the level at once (config reload): of C{observer}, made by
    L{make_observer} (or C{None} when twistd's own logging is in use), and
    of the libraries that log through txaio.
    """
    predicate = getattr(observer, "level_predicate", None)
    if predicate is not None:
        predicate.setLogLevelForNamespace(None, LEVELS[level])
    txaio.set_global_log_level(level)


def apply_library_levels(log_config):
    """Quiet libraries that log through txaio (Autobahn) below our level."""
    txaio.use_twisted()
    txaio.set_global_log_level(log_config.level)


class LoggingRoot(MultiService):
    """
    The top service of a twistd program: on joining the application it
    registers C{observer} as the application's C{ILogObserver}.
    """

    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None and parent.getComponent(ILogObserver, None) is None:
            set_component(ILogObserver, self.observer)
