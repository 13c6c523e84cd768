# -*- test-case-name: tests.test_tap -*-
"""
twistd glue shared by both programs: the C{--config} option, loaded and
validated in C{postOptions} so a bad file stops twistd with one line.
"""

from twisted.python import usage

from anyproxy.config import load_config
from anyproxy.errors import ConfigError


class ConfigOptions(usage.Options):
    """C{--config=FILE}; subclasses name the section they need in C{role}."""

    role = None
    optParameters = [
        ["config", "c", "etc/anyproxy.yaml", "The YAML configuration file."],
    ]

    def postOptions(self):
        try:
            config = load_config(self["config"], role=self.role)
            getattr(config, "require_" + self.role)()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["loaded"] = config
