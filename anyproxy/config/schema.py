# -*- test-case-name: tests.test_config -*-
"""
How a config class states its YAML keys, so that each key is stated once.

Every attrs field of a config class (L{anyproxy.config.model}, and
L{anyproxy.access_policy.LimitRule} for C{client.limit} entries) is declared
with one of:

  - L{setting}: read from the YAML key of the field's name, or C{key}
    (C{keys} when several keys build one value).  Its default is the key's
    default: the reader (L{anyproxy.config.load}) takes it from here when the
    key is absent or null, and for a string also when it is empty.
  - L{derived}: computed by the reader from other keys (the endpoint string
    of a C{listen_addr}, the file's own path); not a key.
  - L{inline}: a value built from keys of the same mapping that another
    config class states (a C{proxy.frontends} entry holds a listener's keys).

L{yaml_keys} lists a class's keys.  The reader takes them as the known keys
of that mapping, refusing any other, and asks L{default} for a key's
default; a reload names changed values with L{key_name}.  A field declared
with none of the three is an error the first time its class is read, so a
new field cannot be left out of the schema.

YAML keys are a contract (add keys, never rename them): as a field's name is
its key, rename a field only with C{key=} set to the old name.
"""

import functools

import attr

_METADATA = "anyproxy.config.schema"


@attr.s(frozen=True, slots=True)
class _Declared:
    """What one field is in the YAML file."""

    keys = attr.ib()  # the key names; None: the field's own name; (): not a key
    secret = attr.ib(default=False)  # never shown, never trimmed
    inline = attr.ib(default=None)  # a config class whose keys this mapping holds


def setting(default=attr.NOTHING, key=None, keys=None, secret=False, factory=None, **kwargs):
    """
    A field read from a YAML key.

    @param default: the key's default; none means the key is required.
    @param key: the YAML key, when it is not the field's name.
    @param keys: the YAML keys, when several build this one value.
    @param secret: a password: left out of C{repr}, and kept with its spaces.
    @param factory: a callable making the default, as for C{attr.ib}.
    @param kwargs: passed to C{attr.ib}.
    """
    if secret:
        kwargs["repr"] = False
    names = tuple(keys) if keys is not None else (key,) if key is not None else None
    return attr.ib(default=default, factory=factory,
                   metadata={_METADATA: _Declared(names, secret)}, **kwargs)


def derived(default=attr.NOTHING, factory=None, **kwargs):
    """A field the reader computes from other keys; not a YAML key itself."""
    return attr.ib(default=default, factory=factory,
                   metadata={_METADATA: _Declared(())}, **kwargs)


def inline(config_class, **kwargs):
    """A C{config_class} value read from keys of this same mapping."""
    return attr.ib(metadata={_METADATA: _Declared((), inline=config_class)}, **kwargs)


def _declared(field, owner=None):
    declared = field.metadata.get(_METADATA)
    if declared is None:
        name = "%s.%s" % (owner.__name__, field.name) if owner else field.name
        raise TypeError("%s is not declared with setting(), derived() or inline() "
                        "(anyproxy.config.schema)" % (name,))
    return declared


def key_name(field):
    """
    The YAML key a L{setting} field is read from (C{"a/b"} for several), or
    C{None} for a L{derived} or L{inline} field.
    """
    declared = _declared(field)
    if declared.keys is None:
        return field.name
    return "/".join(declared.keys) or None


@functools.lru_cache(maxsize=None)
def _fields_by_key(config_class):
    """C{{key: (field, _Declared)}} in the order the class states them."""
    by_key = {}
    for field in attr.fields(config_class):
        declared = _declared(field, config_class)
        if declared.inline is not None:
            by_key.update(_fields_by_key(declared.inline))
        for key in (field.name,) if declared.keys is None else declared.keys:
            by_key[key] = (field, declared)
    return by_key


def yaml_keys(config_class):
    """The YAML keys a mapping read as C{config_class} may hold, in order."""
    return tuple(_fields_by_key(config_class))


def _lookup(config_class, key):
    try:
        return _fields_by_key(config_class)[key]
    except KeyError:
        raise KeyError("%r is not a key of %s" % (key, config_class.__name__)) from None


def default(config_class, key):
    """
    The default of C{key} in a mapping read as C{config_class}, or
    C{attr.NOTHING} when the key is required (or builds a value together with
    other keys, which have no default of their own).

    @raise KeyError: C{config_class} has no such key.
    """
    field, declared = _lookup(config_class, key)
    if declared.keys is not None and len(declared.keys) > 1:
        return attr.NOTHING
    if isinstance(field.default, attr.Factory):
        return field.default.factory()
    return field.default


def is_secret(config_class, key):
    """Whether C{key} of C{config_class} holds a secret (a password)."""
    return _lookup(config_class, key)[1].secret
