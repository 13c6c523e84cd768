# -*- test-case-name: tests.test_e2e_twistd -*-
"""
twistd glue shared by both programs: the C{--config} option, loaded and
validated in C{postOptions} so a bad file stops twistd with one line on
stderr and exit code 1.
"""

import os
import sys

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from anyproxy.config.go_format import warnings_for
from anyproxy.config.load import load_config
from anyproxy.errors import ConfigError
from anyproxy.tuning import tune_malloc
from anyproxy.logs import LoggingRoot, apply_library_levels, make_observer
from anyproxy.memory import FreezeAfterStartup
from anyproxy.reactor_dispatch import dispatch_directly

log = Logger()


class ConfigOptions(usage.Options):
    """C{--config=FILE}; subclasses name the section they need in C{role}."""

    role = None
    optParameters = [
        ["config", "c", "etc/anyproxy.yaml", "The YAML configuration file."],
    ]

    def postOptions(self):
        try:
            # Where relative paths of a Go AnyProxy file resolve, now and at
            # each reload (twistd may change directory: --rundir).
            self["start_dir"] = os.getcwd()
            config = load_config(self["config"], role=self.role, start_dir=self["start_dir"])
            getattr(config, "require_" + self.role)()
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole Usage block
            # before it.  The one line (file: key: problem), exit code 1.
            print(str(e), file=sys.stderr)
            raise SystemExit(1) from None
        self["loaded"] = config


def built(options, build):
    """
    C{build()}, the program's service from the loaded config; what it
    refuses only once it builds (a key that does not match its certificate)
    stops twistd with one line naming the file, as L{ConfigOptions} does.
    """
    try:
        return build()
    except ConfigError as e:
        print("%s: %s" % (options["config"], e), file=sys.stderr)
        raise SystemExit(1) from None


def logging_root(service, options):
    """
    Put C{service} under a L{LoggingRoot} for the config's C{log} section,
    writing where twistd's own options say unless the config names a file;
    and set up the process the same way for both programs: malloc
    thresholds, the start-up freeze, and socket events dispatched directly
    (L{anyproxy.reactor_dispatch}).
    """
    config = options["loaded"]
    twistd = options.parent or {}
    tune_malloc()
    apply_library_levels(config.log)
    if twistd.get("syslog") or twistd.get("logger"):
        root = MultiService()  # the operator chose twistd's own log handling
    else:
        root = LoggingRoot(make_observer(config.log, twistd.get("logfile"),
                                         nodaemon=bool(twistd.get("nodaemon", True))))
    service.setServiceParent(root)
    add_reloader(root, service, options)
    from twisted.internet import reactor

    FreezeAfterStartup(reactor).setServiceParent(root)
    dispatch_directly(reactor)
    # Features a Go AnyProxy file asks for that are not started here.
    for line in warnings_for(config, options.role):
        log.warn("{line}", line=line)
    return root


def add_reloader(root, service, options):
    """
    Reload the config file on SIGHUP (L{anyproxy.twistd.reload}): C{service}'s
    C{reconfigure} gets each good new version, at the log level of
    C{root}'s observer.
    """
    from twisted.internet import reactor

    from anyproxy.twistd.reload import Reloader

    # The file's absolute path: twistd may have changed directory (--rundir).
    reloader = Reloader(options["loaded"].path, options.role, service, options["loaded"], reactor,
                        observer=getattr(root, "observer", None), handle_signal=True,
                        start_dir=options.get("start_dir"))
    reloader.setServiceParent(root)
    return reloader
