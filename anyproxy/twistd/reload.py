# -*- test-case-name: tests.test_reload -*-
"""
Config reload: SIGHUP (or L{Reloader.reload}) re-reads the config file and
applies it to the running program without a restart.

The file is loaded and checked exactly as at start (L{load_config}).  A file
that does not load (bad YAML, unknown key, bad CIDR, missing certificate) is
refused with one log line, C{reload refused: <file>: <key>: <problem>}, and
the running config stays in force.  A good one is handed to the program's
C{reconfigure(config)} (L{anyproxy.gateway.app.Gateway},
L{anyproxy.client.app.ClientRoot}), which applies it to new connections
and leaves established ones alone; then the log level changes and one line
says C{reload applied: <the keys that changed>}.  A C{reconfigure} that
raises L{ConfigError} (a key that does not match its certificate) has
changed nothing, and the reload is refused the same way.

Reloads run one at a time: a SIGHUP arriving while listeners are still being
re-bound waits for that reload to finish.

The signal handler is installed only when asked (the twistd programs ask):
in-process tests call L{Reloader.reload} and leave the process's signals
alone.  Python runs signal handlers between bytecodes on the main thread,
where the reactor may be in the middle of anything, so the handler only
schedules the reload with C{callFromThread} (which also wakes the reactor).
"""

import signal

import attr
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from anyproxy.config.model import (
    ClientConfig, Config, FleetConfig, GatewayConfig, ListenerConfig, LogConfig, ProxyConfig)
from anyproxy.config.load import load_config
from anyproxy.config.schema import key_name
from anyproxy.errors import ConfigError
from anyproxy.logs import set_log_level

log = Logger()

# Keys a reload reads but cannot apply: their listener or log destination is
# set up once, at start.  A change is logged as needing a restart.
# (metrics_addr and status_addr move when changed; switching them on or off
# is reported by reconfigure.)
RESTART_KEYS = ("log.format", "log.file", "log.output", "log.max_size", "log.max_backups",
                "log.max_age", "log.compress",
                # Joining or leaving a fleet, and what the registry was built
                # with (its Redis, the node's id, how long it keeps peers).
                "gateway.fleet", "gateway.fleet.redis", "gateway.fleet.node_id",
                "gateway.fleet.keep_peers")

# The rotation keys the gateway's access log (gateway.access_log) also
# reads: it reopens with them at a reload, while the main log keeps its own.
_ROTATION_KEYS = ("log.max_size", "log.max_backups", "log.max_age", "log.compress")

# Each program's part of a (possibly shared) file.
_SECTIONS = {"gateway": ("proxy", "gateway", "log"), "client": ("client", "log")}
# Classes compared key by key (their keys are the schema's, derived fields
# left out); any other value is compared whole.
_SECTION_CLASSES = (Config, ProxyConfig, ListenerConfig, GatewayConfig, ClientConfig, LogConfig,
                    FleetConfig)


def changed_keys(old, new, path=""):
    """
    The config keys whose values differ between two loaded configs, as
    key paths (C{"proxy.socks5.auth_password"}); values are never shown.
    """
    if type(old) is type(new) and isinstance(old, _SECTION_CLASSES):
        keys = []
        for field in attr.fields(type(old)):
            key = key_name(field)
            if key is None:
                continue
            keys.extend(changed_keys(getattr(old, field.name), getattr(new, field.name),
                                     "%s.%s" % (path, key) if path else key))
        return keys
    return [] if old == new else [path]


def summarize(old, new, role):
    """
    C{(summary, restart)}: one line saying what changed in C{role}'s part of
    the file, and the changed keys that take effect only at a restart.
    """
    sections = _SECTIONS[role]
    keys = [key for key in changed_keys(old, new) if key.split(".")[0] in sections]
    restart = [key for key in keys if key in RESTART_KEYS]
    applied = [key for key in keys if key not in RESTART_KEYS]
    summary = ", ".join(applied) + " changed" if applied else "no key changed"
    return summary + "; certificates re-read", restart


class Reloader(Service):
    """
    Reloads one program's config file on request.

    @param path: the config file.
    @param role: C{"gateway"} or C{"client"}, as for L{load_config}.
    @param target: the program's service; it provides C{reconfigure(config)}
        (returning a list of notes, or a Deferred of one).
    @param config: the L{Config} in force now.
    @param reactor: for C{callFromThread} from the signal handler.
    @param observer: the log observer made by L{anyproxy.logs.make_observer}
        whose level C{log.level} sets, or C{None}.
    @param handle_signal: install a SIGHUP handler while running.
    @param start_dir: the directory the program started in (see L{load_config}).

    @ivar config: the config in force.
    """

    def __init__(self, path, role, target, config, reactor, observer=None, handle_signal=False,
                 start_dir=None):
        self.path = path
        self.start_dir = start_dir
        self.role = role
        self.target = target
        self.config = config
        self._reactor = reactor
        self._observer = observer
        self._handle_signal = handle_signal
        self._previous_handler = None
        self._lock = defer.DeferredLock()

    def startService(self):
        super().startService()
        if self._handle_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return super().stopService()

    def _on_signal(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self):
        """
        Re-read the file and apply it.

        @return: a Deferred firing with C{True} when the new config was
            applied, C{False} when it was refused (never failing).
        """
        return self._lock.run(self._reload)

    def _reload(self):
        try:
            config = load_config(self.path, role=self.role, start_dir=self.start_dir)
            getattr(config, "require_" + self.role)()
        except ConfigError as e:
            return self._refused(e)
        except Exception:
            # Nothing has been applied yet: the running config is whole.
            log.failure("reload refused: the file could not be read as a config")
            return False
        d = defer.maybeDeferred(self.target.reconfigure, config)
        d.addCallback(self._applied, config)
        d.addErrback(self._failed)
        return d

    def _refused(self, error):
        log.error("reload refused: {error}", error=str(error))
        return False

    def _applied(self, notes, config):
        old, self.config = self.config, config
        summary, restart = summarize(old, config, self.role)
        log.info("reload applied: {summary}", summary=summary)
        for note in notes or ():
            log.warn("reload: {note}", note=note)
        if restart:
            rotation = self.role == "gateway" and any(key in _ROTATION_KEYS for key in restart)
            log.warn("reload: {keys} changed: takes effect at the next restart{access}",
                     keys=", ".join(restart),
                     access=" (the access log's rotation follows the new values at once)"
                     if rotation else "")
        if config.log.level != old.log.level:
            set_log_level(self._observer, config.log.level)
        return True

    def _failed(self, failure):
        if failure.check(ConfigError):
            return self._refused(failure.value)
        log.failure("reload failed; the running config may be partly changed", failure)
        return False
