# -*- test-case-name: tests.test_frontend_plugins -*-
"""
Finding frontend plugins by name.

Frontends are L{anyproxy.interfaces.IFrontendFactory} plugins in the
L{anyproxy.plugins} package (which other distributions extend, see its
docstring).  Listing them imports every module there; Twisted keeps a
C{dropin.cache} beside the modules so later listings are cheap.  A module
that fails to import is logged by Twisted and skipped, so one broken
third-party plugin does not take the built-in frontends down with it.
"""

from twisted.logger import Logger
from twisted.plugin import getPlugins

import anyproxy.plugins
from anyproxy.interfaces import IFrontendFactory

log = Logger()


class UnknownFrontend(LookupError):
    """No plugin (or more than one) has the asked-for name; the message says which exist."""


def _origin(plugin):
    return "%s.%s" % (type(plugin).__module__, type(plugin).__qualname__)


def _by_name():
    found = {}
    for plugin in getPlugins(IFrontendFactory, anyproxy.plugins):
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            log.warn("frontend plugin {origin} has no name; ignored", origin=_origin(plugin))
            continue
        found.setdefault(name, []).append(plugin)
    return found


def available_frontends():
    """C{{name: plugin}} for every frontend plugin found (duplicates left out)."""
    return {name: plugins[0] for name, plugins in _by_name().items() if len(plugins) == 1}


def find_frontend(name):
    """
    The L{IFrontendFactory} plugin called C{name}.

    @raise UnknownFrontend: no plugin has that name (the message lists the
        names there are), or two plugins claim it (the message names both).
    """
    found = _by_name()
    plugins = found.get(name, [])
    if len(plugins) == 1:
        return plugins[0]
    if plugins:
        raise UnknownFrontend("frontend %r is provided by several plugins (%s); remove all "
                              "but one" % (name, ", ".join(sorted(map(_origin, plugins)))))
    raise UnknownFrontend("unknown frontend %r (available: %s)"
                          % (name, ", ".join(sorted(found)) or "none"))


def check_frontend_options(plugin, options):
    """
    Run the plugin's optional C{check_options}.

    @raise ValueError: (or L{anyproxy.interfaces.OptionError}) from the plugin.
    """
    check = getattr(plugin, "check_options", None)
    if check is not None:
        check(options)
