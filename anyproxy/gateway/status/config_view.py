# -*- test-case-name: tests.test_management_api -*-
"""
The effective gateway config as JSON, secrets redacted (C{GET /api/config}).

Keys and values come from the loaded L{anyproxy.config.model.Config}, walked
with the schema (L{anyproxy.config.schema}): each key under its YAML name,
derived fields (endpoint strings) left out, and every key the schema marks
secret (L{anyproxy.config.schema.is_secret}) replaced by L{REDACTED} when it
is set.  The Redis URL of C{gateway.fleet} is a secret whose host is worth
seeing: it keeps its scheme, host, port and database, and loses its user,
password and query.  Frontend plugin options are the plugin's own; an option
whose name suggests a secret (L{SECRET_WORDS}) is redacted too.
"""

import attr

from anyproxy.config import schema
from anyproxy.config.model import FleetConfig
from anyproxy.config.redis_url import parse_redis_url

REDACTED = "<redacted>"
# A plugin option whose name holds one of these is treated as a secret.
SECRET_WORDS = ("password", "secret", "token", "key", "credential", "auth")
# The sections a gateway reads from a (possibly shared) file.
GATEWAY_SECTIONS = ("proxy", "gateway", "log")


def _redis_display(url):
    """
    A Redis URL as the registry names it in logs: host, port and database,
    never a part of the password (an unencoded one may split the URL
    anywhere, which cutting the user and password out of it cannot tell).
    """
    try:
        return parse_redis_url(url).display
    except ValueError:
        return REDACTED


def _redacted(value):
    if isinstance(value, (tuple, list)):
        return [REDACTED if each else "" for each in value]
    return REDACTED if value else value


def _is_config(config_class):
    """Whether C{config_class} declares YAML keys (L{schema}), not just any attrs class."""
    try:
        schema.yaml_keys(config_class)
    except TypeError:
        return False
    return True


def _plain(value):
    """A config value as JSON: attrs sections walked, tuples as lists, mappings as objects."""
    if attr.has(type(value)):
        if _is_config(type(value)):
            return config_json(value)
        # A value parsed from the file (a host rule): as written.
        return getattr(value, "text", None) or str(value)
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_plain(each) for each in value]
    if hasattr(value, "items"):
        return {str(key): (REDACTED if _looks_secret(key) and item else _plain(item))
                for key, item in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _looks_secret(name):
    name = str(name).lower()
    return any(word in name for word in SECRET_WORDS)


def config_json(section):
    """One config class instance (a section or an entry) as a JSON-able dict, redacted."""
    config_class = type(section)
    result = {}
    for field in attr.fields(config_class):
        value = getattr(section, field.name)
        key = schema.key_name(field)
        if key is None:
            if attr.has(type(value)) and _is_config(type(value)):  # an inline section
                result.update(config_json(value))
            continue
        if "/" in key:  # several keys built one value: shown under the first
            key = key.split("/")[0]
        if config_class is FleetConfig and field.name == "redis":
            result[key] = _redis_display(value) if value else value
        elif schema.is_secret(config_class, key):
            result[key] = _redacted(value)
        else:
            result[key] = _plain(value)
    return result


def gateway_config_json(config):
    """The gateway's sections of a loaded config, redacted, with the file's path."""
    shown = {"path": getattr(config, "path", None)}
    for name in GATEWAY_SECTIONS:
        section = getattr(config, name, None)
        shown[name] = config_json(section) if section is not None else None
    return shown
