"""
What a measurement module gives the harness, and its result in JSON.

A measurement is one module in ``benchmarks/measurements/`` that ends with

    MEASUREMENT = Measurement(name=..., number=..., result=TheResult, run=run,
                              rows=rows, raw=raw, panels=panels, ...)

and one line in ``measurements/__init__.py``'s ``ALL``.  Its result is an
attrs class whose fields have types (see L{to_json} for the ones allowed):
``run(env)`` returns it, and ``rows``, ``raw`` and ``panels`` read nothing
else, so the report and the chart can be rebuilt from latest.json.
"""

import typing

import attr


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Option:
    """A command-line option a measurement adds: an integer with a full-run and a --quick default."""
    flag: str                              # "--streams"
    help: str                              # "idle streams"
    default: int                           # for a full run
    quick: typing.Optional[int] = None     # for --quick (None: the same)
    minimum: typing.Optional[int] = None   # values below are raised to it

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser):
        quick = "" if self.quick is None else "; --quick: %d" % self.quick
        parser.add_argument(self.flag, type=int, help="%s (default %d%s)" % (self.help, self.default, quick))

    def resolve(self, args):
        """Fill in the default (full or --quick) and apply the minimum."""
        value = getattr(args, self.dest)
        if value is None:
            value = self.quick if args.quick and self.quick is not None else self.default
        if self.minimum is not None:
            value = max(self.minimum, value)
        setattr(args, self.dest, value)


def _nothing(*args):
    return []


def _no_settings(args):
    return ""


def _no_streams(args):
    return 0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Measurement:
    name: str              # its --only name and its key in latest.json
    number: int            # its number in the table; the report and the chart go by it
    summary: str           # one line for --help
    result: type           # the attrs class run() returns
    run: typing.Callable   # run(env: Env) -> result
    rows: typing.Callable  # rows(result) -> [report.Row]: the table
    example: typing.Any    # a canned result, for selfcheck.py
    raw: typing.Callable = _nothing          # raw(result) -> [str]: Markdown lines under "Raw figures"
    panels: typing.Callable = _nothing       # panels(result) -> [chart.Panel]
    settings: typing.Callable = _no_settings  # settings(args) -> str, for the report's settings line
    options: typing.Sequence[Option] = ()    # command-line options it adds
    needs: typing.FrozenSet[str] = frozenset()  # started for it: keys of services.NEEDS
    tools: typing.Sequence[str] = ()         # commands it runs itself (checked before anything starts)
    aliases: typing.Sequence[str] = ()       # other --only names that select it too
    by_default: bool = True                  # False: runs only when --only names it
    open_streams: typing.Callable = _no_streams  # open_streams(args) -> streams it holds open at once


@attr.s(frozen=True, auto_attribs=True)
class Env:
    """What run() gets: the started services, the options, the RSS sampler, DEFAULT_WINDOW."""
    services: typing.Any   # harness.services.Services
    args: typing.Any       # argparse.Namespace
    rss: typing.Any        # harness.memory.Rss
    window: int

    @property
    def processes(self):
        return self.services.processes


# ---------------------------------------------------------------------------
# results to and from JSON

KEY_JOIN = " / "  # a tuple key ("AnyProxy", "upload") is written "AnyProxy / upload"


def to_json(value):
    """
    An attrs result as JSON data: attrs instances become objects (fields in
    their order; an optional field whose default and value are None is left
    out), tuple keys are joined with " / ", tuples become lists.
    """
    if attr.has(type(value)):
        out = {}
        for field in attr.fields(type(value)):
            item = getattr(value, field.name)
            if item is None and field.default is None:
                continue
            out[field.name] = to_json(item)
        return out
    if isinstance(value, dict):
        return {(KEY_JOIN.join(k) if isinstance(k, tuple) else k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(kind, data):
    """
    The value of type C{kind} that L{to_json} wrote as C{data}.  Types: attrs
    classes, List, Tuple, Dict (keys str, int or a Tuple of str), Optional,
    int, float, str, bool, Any.
    """
    if kind is typing.Any:
        return data
    if attr.has(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{field.name: from_json(hints[field.name], data[field.name])
                       for field in attr.fields(kind) if field.name in data})
    origin, params = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        if data is None and type(None) in params:
            return None
        (inner,) = [p for p in params if p is not type(None)]
        return from_json(inner, data)
    if origin is list:
        return [from_json(params[0], x) for x in data]
    if origin is tuple:
        if len(params) == 2 and params[1] is Ellipsis:
            return tuple(from_json(params[0], x) for x in data)
        return tuple(from_json(p, x) for p, x in zip(params, data))
    if origin is dict:
        key, value = params
        return {_key(key, k): from_json(value, v) for k, v in data.items()}
    if kind is float:
        return float(data)
    if kind in (int, str, bool):
        return kind(data)
    raise TypeError("from_json: unsupported type %r" % (kind,))


def _key(kind, text):
    if typing.get_origin(kind) is tuple:
        parts = tuple(text.split(KEY_JOIN))
        if len(parts) != len(typing.get_args(kind)):
            raise ValueError("key %r: expected %d parts" % (text, len(typing.get_args(kind))))
        return parts
    return kind(text)
