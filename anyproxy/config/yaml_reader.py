# -*- test-case-name: tests.test_config -*-
"""
Reading a YAML config strictly: duplicate keys and unknown keys refused, each
value type-checked, and every error one line naming the file and key path.
Each mapping is read as a config class, which gives its known keys and their
defaults (L{anyproxy.config.schema}); L{anyproxy.config.load} builds the
L{anyproxy.config.model} classes with these readers.
"""

import difflib
import os

import attr
import yaml

from anyproxy.addresses import listen_endpoint, split_endpoint
from anyproxy.config import schema
from anyproxy.errors import ConfigError

_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number",
               str: "a string", list: "a list", dict: "a mapping", type(None): "nothing"}


def type_name(value):
    kind = type(value)
    for plain in (int, float):  # the loader's numbers that keep their text
        if kind is not bool and issubclass(kind, plain):
            kind = plain
    return _TYPE_NAMES.get(kind, kind.__name__)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the later one would win)."""


def _construct_mapping(loader, node, deep=False):
    # Duplicates among the keys written here, before merge keys (<<: *base)
    # bring in theirs, which the keys written here may override.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate key %r" % (key,), key_node.start_mark)
            seen.add(key)
        except TypeError:
            pass
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Int(int):
    """An integer as YAML read it, with the text it was written as (C{raw})."""


class _Float(float):
    """A number with a fraction as YAML read it, with the text it was written as (C{raw})."""


def _keeping_text(kind, construct):
    # The Go AnyProxy (yaml.v2) reads an unquoted number into a string key
    # as the text written: `group_password: 0123` is "0123", not the octal
    # 83 YAML 1.1 makes of it.  Numbers keep their text for Node.string.
    def construct_keeping_text(loader, node):
        value = kind(construct(loader, node))
        value.raw = node.value
        return value
    return construct_keeping_text


def plain(value):
    """
    C{value} (YAML data) with its numbers as plain C{int} and C{float},
    nested too: for what leaves the loader as it is (a frontend plugin's
    C{options}), whose checks may ask C{type(value) is int}.

    @raise ValueError: C{value} holds itself (C{&a [*a]}), or nests or
        expands (YAML aliases repeat what they name) past L{MAX_PLAIN_ITEMS}
        items, which every later walk of it (a check, the status page's
        config view, a reload's comparison) would pay for again.
    """
    count = [0]
    return _plain(value, count, set())


# Items a plugin's options may expand to: far more than any config needs.
MAX_PLAIN_ITEMS = 10000


def _plain(value, count, inside):
    count[0] += 1
    if count[0] > MAX_PLAIN_ITEMS:
        raise ValueError("more than %d values once YAML aliases are expanded" % (MAX_PLAIN_ITEMS,))
    if isinstance(value, (dict, list)):
        if id(value) in inside:
            raise ValueError("holds itself (a YAML alias of its own anchor)")
        inside.add(id(value))
        try:
            if isinstance(value, dict):
                return {key: _plain(each, count, inside) for key, each in value.items()}
            return [_plain(each, count, inside) for each in value]
        finally:
            inside.discard(id(value))
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int",
                              _keeping_text(_Int, yaml.SafeLoader.construct_yaml_int))
_StrictLoader.add_constructor("tag:yaml.org,2002:float",
                              _keeping_text(_Float, yaml.SafeLoader.construct_yaml_float))


@attr.s
class Reader:
    """
    The file being loaded: where errors point and how paths resolve.

    @ivar nodes: every L{Node} read from the file, in order (for tests).
    @ivar aliases: C{{our key path: the path as written}} for keys a file in
        another form holds elsewhere (L{anyproxy.config.go_format}): an
        error under one of our paths names the key the user wrote.
    @ivar relative_to: what relative file paths are relative to, for errors.
    """

    source = attr.ib()
    base_dir = attr.ib()
    check_files = attr.ib()
    nodes = attr.ib(factory=list, repr=False)
    aliases = attr.ib(factory=dict, repr=False)
    relative_to = attr.ib(default="the config file's directory", repr=False)
    start_dir = attr.ib(default=None, repr=False)  # see load_config

    def written(self, path):
        """C{path} as the file writes it (see C{aliases})."""
        for ours in sorted(self.aliases, key=len, reverse=True):
            if path == ours or path.startswith((ours + ".", ours + "[")):
                return self.aliases[ours] + path[len(ours):]
        return path

    def fail(self, path, problem):
        problem = " ".join(str(problem).split())
        path = self.written(path)
        raise ConfigError("%s: %s: %s" % (self.source, path, problem) if path
                          else "%s: %s" % (self.source, problem))


@attr.s
class Node:
    """
    One mapping in the file, with its key path, read as a config class.

    The class (L{anyproxy.config.model}) states the mapping's keys and
    their defaults (L{anyproxy.config.schema}): any other key is refused, and
    a key that is absent or null takes its default, as does an empty string.
    A required key (one without a default) reads as C{""} when it is a
    string; the loader says what it needs.

    @ivar model: the config class.
    @ivar consulted: the keys read so far.
    """

    reader = attr.ib()
    path = attr.ib()
    data = attr.ib()
    model = attr.ib()
    check_files = attr.ib(default=True)
    consulted = attr.ib(factory=set, repr=False)

    @classmethod
    def of(cls, reader, path, value, model, check_files=True):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            reader.fail(path, "expected a mapping, got %s" % (type_name(value),))
        known = schema.yaml_keys(model)
        for key in value:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                reader.fail(join_path(path, key), "unknown key%s" % (
                    " (did you mean %r?)" % (hint[0],) if hint else
                    " (expected one of: %s)" % (", ".join(known),)))
        node = cls(reader, path, value, model, check_files)
        reader.nodes.append(node)
        return node

    def key(self, key):
        return join_path(self.path, key)

    def fail(self, key, problem):
        self.reader.fail(self.key(key), problem)

    def default(self, key):
        """The model's default for C{key}; C{attr.NOTHING} if it is required."""
        return schema.default(self.model, key)

    def given(self, key):
        """Whether C{key} has a value (null counts as absent)."""
        self.consulted.add(key)
        return self.data.get(key) is not None

    def _value(self, key, types, what):
        """C{key}'s value checked against C{types}, or C{None} when absent."""
        self.consulted.add(key)
        value = self.data.get(key)
        if value is not None and (not isinstance(value, types)
                                  or (bool not in types and isinstance(value, bool))):
            self.fail(key, "expected %s, got %s" % (what, type_name(value)))
        return value

    def get(self, key, types, what):
        """C{key}'s value checked against C{types}, or its default when absent."""
        value = self._value(key, types, what)
        return self.default(key) if value is None else value

    def string(self, key):
        value = self.get(key, (str, _Int, _Float), "a string")
        if isinstance(value, (_Int, _Float)):
            value = value.raw  # as the Go AnyProxy reads it: the text written
        # Secrets (passwords) keep their spaces; everything else is trimmed.
        if isinstance(value, str) and not schema.is_secret(self.model, key):
            value = value.strip()
        if value == "":
            value = self.default(key)
        return "" if value is attr.NOTHING else value

    def boolean(self, key):
        return self.get(key, (bool,), "true or false")

    def integer(self, key, low=0, high=None):
        value = self.get(key, (int,), "an integer")
        if value is attr.NOTHING:
            self.fail(key, "required")
        if value < low or (high is not None and value > high):
            self.fail(key, "%d is out of range (%d-%s)" % (value, low, high or "..."))
        return value

    def number(self, key, positive=False):
        try:
            value = float(self.get(key, (int, float), "a number of seconds"))
        except OverflowError:
            value = float("inf")
        if value < 0 or (positive and value == 0) or value != value or value == float("inf"):
            self.fail(key, "must be %s, got %r" % ("> 0" if positive else ">= 0", value))
        return value

    def choice(self, key, choices, aliases=None):
        value = self.get(key, (str,), "one of: %s" % (", ".join(choices),)).strip().lower()
        value = (aliases or {}).get(value, value)
        if value not in choices:
            self.fail(key, "%r is not one of: %s" % (value, ", ".join(choices)))
        return value

    def items(self, key):
        """C{[(key path, item)]} of the list at C{key}; absent: C{[]}."""
        value = self._value(key, (list,), "a list") or []
        return [("%s[%d]" % (self.key(key), i), item) for i, item in enumerate(value)]

    def child(self, key, model, check_files=None):
        self.consulted.add(key)
        check = self.check_files if check_files is None else check_files
        return Node.of(self.reader, self.key(key), self.data.get(key), model, check)

    def file(self, key, required=False):
        value = self.string(key)
        if not value:
            if required:
                self.fail(key, "required (path to a PEM file)")
            return None
        path = os.path.normpath(os.path.join(self.reader.base_dir, os.path.expanduser(value)))
        if self.check_files and self.reader.check_files and not os.path.isfile(path):
            self.fail(key, "file not found: %s (relative paths are relative to %s)"
                      % (path, self.reader.relative_to))
        return path

    def listen(self, key):
        """C{(raw listen_addr, endpoint, local)}; endpoint C{None} if empty."""
        value = self.get(key, (str, int), "a string such as ':1080'")
        raw = (":%d" % value) if isinstance(value, int) else value.strip()
        if not raw:
            return raw, None, False
        try:
            endpoint, local = listen_endpoint(raw)
        except ValueError as e:
            self.fail(key, e)
        if self.check_files and self.reader.check_files:
            # An ssl: endpoint names its files; Twisted would read them only
            # when listening, and stop the program with a traceback.
            for option in split_endpoint(endpoint)[1:]:
                name, _, path = option.partition("=")
                if name in ("privateKey", "certKey", "extraCertChain") and path \
                        and not os.path.isfile(path):
                    self.fail(key, "%s file not found: %s" % (name, path))
        return raw, endpoint, local

    def credentials(self, user_key, password_key):
        username, password = self.string(user_key), self.string(password_key)
        if bool(username) != bool(password):
            self.fail(password_key if username else user_key,
                      "set both %s and %s, or neither" % (user_key, password_key))
        return username, password


def join_path(path, key):
    return "%s.%s" % (path, key) if path else str(key)


def read_yaml(reader, path):
    try:
        with open(path, encoding="utf-8") as f:
            documents = list(yaml.load_all(f, Loader=_StrictLoader))
    except OSError as e:
        reader.fail("", "cannot read: %s" % (e.strerror or e,))
    except UnicodeDecodeError:
        reader.fail("", "not UTF-8 text")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = "line %d, column %d: " % (mark.line + 1, mark.column + 1) if mark else ""
        reader.fail("", "%sbad YAML: %s" % (where, e.problem or e.context))
    except yaml.YAMLError as e:
        reader.fail("", "bad YAML: %s" % (e,))
    except RecursionError:
        reader.fail("", "bad YAML: lists or mappings nested too deep")
    # A "---" followed only by comments (as the Go AnyProxy's examples end)
    # is an empty document; a second document with content would be ignored.
    if any(document is not None for document in documents[1:]):
        reader.fail("", "more than one YAML document ('---'): only one is read; "
                        "remove the others")
    return documents[0] if documents else None
