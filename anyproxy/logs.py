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

import sys

import txaio
from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
    jsonFileLogObserver, textFileLogObserver)
from twisted.python.logfile import LogFile

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


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
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


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
