"""
Frontend plugins for the gateway (L{anyproxy.interfaces.IFrontendFactory}),
found with C{twisted.plugin.getPlugins(IFrontendFactory, anyproxy.plugins)}.

Every module here is imported when the plugins are listed, so a plugin module
should import heavy things lazily.  Other distributions can add modules too:
a directory C{anyproxy/plugins/} WITHOUT an C{__init__.py} anywhere on
C{sys.path} is part of this package (Twisted's C{pluginPackagePaths} trick,
docs/core/howto/plugin.rst).  See docs/FRONTENDS.md.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__ = []
