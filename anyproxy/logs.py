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
the data path.
"""

import re
import sys

import txaio
from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
    jsonFileLogObserver, textFileLogObserver)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


_SECRET_KEY = re.compile(r"passw(or)?d|secret|token|authorization|cookie", re.I)
_SECRET_VALUE = re.compile(r"\b(basic|bearer)\s+[A-Za-z0-9+/=._~-]{4,}", re.I)
REDACTED = "<redacted>"


def redact(event):
    """
    A copy of a log event with secrets masked: fields whose name says they
    hold a secret, and HTTP credentials (C{Basic ...}, C{Bearer ...}) inside
    text values.  Our code never logs secrets; this is the second line.
    """
    clean = {}
    for key, value in event.items():
        if not key.startswith("log_") and _SECRET_KEY.search(key):
            value = REDACTED
        elif isinstance(value, str) and _SECRET_VALUE.search(value):
            value = _SECRET_VALUE.sub(lambda m: m.group(1) + " " + REDACTED, value)
        clean[key] = value
    return clean


@implementer(ILogObserver)
class RedactingObserver:
    """Passes redacted copies of events on to C{observer}."""

    def __init__(self, observer):
        self._observer = observer

    def __call__(self, event):
        self._observer(redact(event))


def _open(path, nodaemon):
    if path == "-" or (not path and nodaemon):
        return sys.stdout
    return LogFile.fromFullPath(path or "twistd.log")


def make_observer(log_config, twistd_logfile=None, nodaemon=True):
    """
    The observer for a L{anyproxy.config.LogConfig}.

    @param twistd_logfile: twistd's C{--logfile} value, used when the config
        names no file.
    """
    stream = _open(log_config.file or twistd_logfile, nodaemon)
    if log_config.format == "json":
        observer = jsonFileLogObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    level = LEVELS[log_config.level]
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    filtering = FilteringLogObserver(RedactingObserver(observer), [predicate])
    filtering.level_predicate = predicate  # for set_log_level (reload)
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
