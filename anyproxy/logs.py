# -*- test-case-name: tests.test_logs -*-
"""
Log setup for the twistd programs: the configured level and format, on the
destination twistd was given.

twistd builds its log observer before our services start, but it first asks
the application for an C{ILogObserver} component; L{LoggingRoot} registers one
when twistd attaches our service tree to the application.  The observer
filters by C{log.level}, writes text or JSON lines (C{log.format}) to
C{log.file} when C{log.output} is C{file} (the default when a file is
named), or else where twistd would have written (its C{--logfile}; the
console with C{-n}, stdout or stderr as C{log.output} says; C{twistd.log}
for a daemon).  Autobahn logs through txaio, which gets the same level so
that debug messages are not even formatted on the data path.  A log file is
rotated at C{log.max_size} MB and keeps C{log.max_backups} rotated files,
none older than C{log.max_age} days, gzipped with C{log.compress}
(L{RotatingLogFile}).

Secrets never reach a destination: what Autobahn's tunnel protocols log is
masked as each event is made (L{library_logger}: its debug lines dump the
opening handshake, the client's C{Authorization} header included), so every
observer, twistd's own too, receives it clean; and our observer masks every
event again (L{RedactingObserver}) before writing it.
"""

import gzip
import os
import re
import shutil
import sys
import threading
import time

import txaio
from twisted.application.service import MultiService
from twisted.logger import (
    FileLogObserver, FilteringLogObserver, ILogObserver, Logger, LogLevel,
    LogLevelFilterPredicate, formatEventAsClassicLogText, jsonFileLogObserver)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from txaio import tx as _txaio_twisted
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}
_ORDER = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)

# The levels the process's log observer writes, once LoggingRoot has
# installed one of ours (None until then, and under twistd's own logging:
# every level counts as written).  Per-stream lines (a request, a stream's
# end) check it with `emits` first: at log.level warn, building events that
# the observer then dropped was ~4% of the gateway's profile per CONNECT.
_written = None


def _gate(level_name):
    global _written
    least = _ORDER.index(LEVELS[level_name])
    _written = frozenset(_ORDER[least:])


def emits(level):
    """Whether an event of C{level} would be written (see C{_written})."""
    return _written is None or level in _written


_SECRET_KEY = re.compile(r"passw(or)?d|secret|token|authorization|cookie", re.I)
REDACTED = "<redacted>"
_SCHEMES = r"basic|bearer|digest|negotiate|ntlm"
# A credential header and its value, to the end of its line: in raw HTTP,
# in a repr (b'...\r\nAuthorization: Basic ...\r\n...', where the line ends
# at a literal backslash-r), or in a dict or JSON rendering
# ({'authorization': 'Basic ...'}, where it ends at the quote).  The
# scheme is kept for diagnosis.
_HEADER = (r"(?P<head>\b(?:proxy[-_]?)?authorization|\b(?:set[-_]?)?cookie)"
           r"(?P<sep>['\"]?\s*[:=]\s*(?:[bu]?['\"])?)"
           r"(?P<scheme>(?:" + _SCHEMES + r") +)?"
           r"(?:[^\r\n'\"\\]|\\(?![rn'\"\\]))+")
# A credential anywhere else: "Basic dXNlcjpwdw==".
_SCHEME_TOKEN = r"\b(?P<scheme>" + _SCHEMES + r")\s+[A-Za-z0-9+/=._~-]{4,}"
# The password in a URL's user information: "redis://:pw@host",
# "http://user:pw@proxy:3128" (the user name is kept for diagnosis).  The
# password runs to the authority's last "@", as URL parsers read it.  A
# scheme starts only where no scheme character precedes it: otherwise each
# letter of "a.a.a..." would start a scan to the end of the text, quadratic
# in a field a peer chooses.
_URL_PASSWORD = (r"(?P<start>(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^:/?#@\s'\"\[\]<>]*:)"
                 r"[^/?#\s'\"<>]*(?=@)")
_TEXT = [(re.compile(_HEADER, re.I), r"\g<head>\g<sep>\g<scheme>" + REDACTED),
         (re.compile(_SCHEME_TOKEN, re.I), r"\g<scheme> " + REDACTED),
         (re.compile(_URL_PASSWORD, re.I), r"\g<start>" + REDACTED)]
_BYTES = [(re.compile(pattern.pattern.encode("ascii"), re.I), replacement.encode("ascii"))
          for pattern, replacement in _TEXT]
_PLAIN = (int, float, type(None), LogLevel)
_MAX_DEPTH = 8


def _scrub_text(text):
    for pattern, replacement in _TEXT:
        text = pattern.sub(replacement, text)
    return text


def _scrub_bytes(data):
    for pattern, replacement in _BYTES:
        data = pattern.sub(replacement, data)
    return data


def _secret_name(name):
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).decode("latin-1")
    return isinstance(name, str) and _SECRET_KEY.search(name) is not None


def _scrub(value, depth=0):
    """C{value} with every credential in it masked; C{value} itself if it held none."""
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _scrub_bytes(bytes(value))
    if isinstance(value, _PLAIN):
        return value
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            # Header dicts: {"authorization": "Basic ..."}, keys str or bytes.
            return {key: REDACTED if _secret_name(key) else _scrub(item, depth + 1)
                    for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            if (isinstance(value, (list, tuple)) and len(value) == 2
                    and _secret_name(value[0])):
                return type(value)((value[0], REDACTED))  # a header pair
            items = [_scrub(item, depth + 1) for item in value]
            return value if items == list(value) else (
                type(value)(items) if type(value) in (list, tuple, set, frozenset) else items)
        # Autobahn's ConnectionRequest / ConnectingRequest / ConnectionResponse
        # render their headers (a client's include Authorization).
        as_json = getattr(type(value), "__json__", None)
        if as_json is not None:
            try:
                data = value.__json__()
            except Exception:
                data = None
            if isinstance(data, dict):
                clean = _scrub(data, depth + 1)
                return value if clean == data else clean
    # Anything else is judged by its text, which is what observers write.
    try:
        text = str(value)
    except Exception:
        return value
    if len(text) > _MASK_AT_MOST:
        return _capped(_scrub_text(text[:_MASK_AT_MOST]), len(text))
    clean = _scrub_text(text)
    return value if clean == text else clean


class _MaskedText(Exception):
    """Stands for an exception whose text held a credential: that text, masked."""

    def __str__(self):
        return self.args[0]


def _scrubbed_failure(failure):
    """
    C{failure} itself, or when its exception's text holds a credential (a
    library quoting a URL with its password, say), a copy with that text
    masked.  The copy keeps the type, frames and traceback, which is what a
    traceback shows besides the text.
    """
    try:
        text = str(failure.value)
    except Exception:
        return failure
    clean = _capped(_scrub_text(text[:_MASK_AT_MOST]), len(text))
    if clean == text:
        return failure
    copy = Failure.__new__(Failure)
    copy.__dict__.update(failure.__dict__)
    copy.value = _MaskedText(clean)
    return copy


# The longest text a field of an event keeps: what a peer sends (a handshake
# header quoted in an error, a name) may be megabytes.
MAX_FIELD = 4096
# Characters that move a terminal's cursor or colour its output, or end a
# line for some readers: in the text format, written as \xNN.  Newlines and
# tabs stay: the classic format indents a message's further lines with a tab,
# so they cannot pass for lines of their own.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


# Text longer than this is cut before it is masked (it is cut at MAX_FIELD
# after): masking costs time in proportion to the text, which a peer chooses.
# The margin keeps a credential that straddles MAX_FIELD whole for masking.
_MASK_AT_MOST = 4 * MAX_FIELD


def _capped(value, length=None):
    """
    C{value} (text or bytes) cut at L{MAX_FIELD} characters, saying how many
    more there were of C{length} (default: C{value}'s own length).
    """
    length = len(value) if length is None else length
    if length <= MAX_FIELD:
        return value
    more = " ... (%d more)" % (length - MAX_FIELD,)
    return value[:MAX_FIELD] + (more if isinstance(value, str) else more.encode("ascii"))


def _escape_control(match):
    return "\\x%02x" % (ord(match.group()),) if ord(match.group()) < 0x100 \
        else "\\u%04x" % (ord(match.group()),)


def safe_classic_text(event):
    """
    Twisted's classic text line for C{event}, with control characters
    written as escapes (see L{_CONTROL}): a peer's text cannot forge a line,
    clear a terminal or colour it.
    """
    text = formatEventAsClassicLogText(event)
    if text is None:
        return None
    return _CONTROL.sub(_escape_control, text)


def redact_fields(fields):
    """
    A copy of C{fields} (an event, or the keyword arguments of one) with
    every credential masked, and each text field cut at L{MAX_FIELD}
    characters.  Fields whose name says they hold a secret
    (C{password}, C{authorization}, C{cookie}, C{token}...) become
    C{<redacted>}; in every other value, of any type (text, bytes, header
    dicts and lists, Autobahn's request objects, anything whose text
    shows one), the values of C{Authorization}, C{Proxy-Authorization},
    C{Cookie} and C{Set-Cookie} headers and C{Basic}/C{Bearer}/...
    credentials are masked.  Twisted's own C{log_*} fields are kept, but
    for their text (C{log_format}, C{log_text}...).
    """
    clean = {}
    for key, value in fields.items():
        if key.startswith("log_"):
            if isinstance(value, str):
                value = _scrub_text(value)
            elif key == "log_flattened":
                value = _scrub(value)
            elif key == "log_failure" and isinstance(value, Failure):
                value = _scrubbed_failure(value)
        elif _SECRET_KEY.search(key):
            value = REDACTED
        else:
            if isinstance(value, (str, bytes)):
                length = len(value)
                value = _capped(_scrub(value[:_MASK_AT_MOST]), length)
            else:
                value = _scrub(value)
                if isinstance(value, (str, bytes)):
                    value = _capped(value)
        clean[key] = value
    return clean


def redact(event):
    """
    A copy of a log event with secrets masked (L{redact_fields}).  Our
    code never logs secrets and Autobahn's protocols log through
    L{library_logger}; this is the second line, at the destination.
    """
    return redact_fields(event)


class RedactingLogger(Logger):
    """
    A C{twisted.logger.Logger} that masks credentials (L{redact_fields}) in
    the format and fields of every event before it exists: no observer,
    whoever installed it, ever receives the secret.
    """

    def emit(self, level, format=None, **kwargs):
        if isinstance(format, str):
            format = _scrub_text(format)
        super().emit(level, format, **redact_fields(kwargs))


def library_logger(namespace):
    """
    A logger for a library that logs through txaio (Autobahn), for a class
    attribute C{log} of our subclasses of its classes, so that what the
    library logs is redacted at the source.

    Why at the source: at debug, Autobahn's WebSocket protocols dump the
    opening handshake, C{Authorization: Basic ...} included: the gateway
    C{"received HTTP request:\\n\\n{data}"} with the raw request as
    I{bytes}, the client C{"sent HTTP request:\\n{request}"} as text, and
    header dicts and request objects in other lines.  A redacting observer
    only protects the destinations it wraps; this event is published to
    every observer of the global publisher (twistd's own log file,
    syslog or C{--logger} when the config names no C{log.file}; the
    beginner's buffer of early events; anything a plugin adds).  Masking
    the fields as the event is made protects all of them, at every level.

    The logger is txaio's own kind (a C{txaio.tx.Logger} around
    L{RedactingLogger}), so it follows C{txaio.set_global_log_level} and
    its methods below the level stay no-ops: nothing is formatted or
    redacted on the data path unless debug is on.
    """
    return _txaio_twisted.Logger(namespace=namespace, logger=RedactingLogger)


@implementer(ILogObserver)
class RedactingObserver:
    """Passes redacted copies of events on to C{observer}."""

    def __init__(self, observer):
        self._observer = observer

    def __call__(self, event):
        self._observer(redact(event))


_MB = 1024 * 1024
_DAY = 24 * 60 * 60
_GZ = ".gz"


class RotatingLogFile(LogFile):
    """
    Twisted's L{LogFile} (rotated by size; C{path.1} is the newest rotated
    file, and a rotation deletes those numbered C{maxRotatedFiles} and
    above), plus what the Go AnyProxy's log section asks for: rotated files
    older than C{maxAge} seconds are deleted, and with C{compress} each
    rotated file is gzipped to C{path.N.gz}.  A number counts once, gzipped
    or not, so C{maxRotatedFiles} and C{maxAge} bound the compressed files
    too.

    Compression runs in a thread, so that a large file does not stall the
    reactor: the file is written to C{path.N.gz.tmp}, renamed to
    C{path.N.gz}, and then C{path.N} is removed, so an interrupted run
    leaves whole files (the next rotation compresses what it left, and
    deletes the partial C{.gz.tmp}).
    While it runs, rotation waits: the current file grows past the size
    until the thread is done, and the next write rotates.

    @ivar maxAge: seconds; C{0} keeps rotated files of any age.
    @ivar compress: gzip rotated files.
    """

    def __init__(self, name, directory, rotateLength=1000000, defaultMode=None,
                 maxRotatedFiles=None, maxAge=0, compress=False):
        self.maxAge = maxAge
        self.compress = compress
        self._compressor = None
        LogFile.__init__(self, name, directory, rotateLength, defaultMode, maxRotatedFiles)
        self.remove_expired()

    def _rotated(self, number):
        """The files on disk numbered C{number}: C{path.N} and/or C{path.N.gz}."""
        names = ("%s.%d" % (self.path, number), "%s.%d%s" % (self.path, number, _GZ))
        return [name for name in names if os.path.exists(name)]

    def listLogs(self):
        """The rotated files' numbers, gzipped or not, in order."""
        prefix = self.name + "."
        numbers = set()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        for name in names:
            if not name.startswith(prefix):
                continue
            number = name[len(prefix):]
            if number.endswith(_GZ):
                number = number[:-len(_GZ)]
            if number.isascii() and number.isdigit() and int(number) > 0:
                numbers.add(int(number))
        return sorted(numbers)

    def write(self, data):
        if self._file.closed:
            self._openFile()  # a rotation could not open it; OSError to the caller again
        LogFile.write(self, data)

    def flush(self):
        if not self._file.closed:
            self._file.flush()

    def compressing(self):
        """Whether a rotated file is being compressed now."""
        return self._compressor is not None and self._compressor.is_alive()

    def wait_for_compression(self, timeout=None):
        """Block until the compression thread (if any) is done (tests, shutdown)."""
        if self._compressor is not None:
            self._compressor.join(timeout)

    def rotate(self):
        """
        As L{LogFile.rotate}, for plain and gzipped files; then delete those
        past C{maxAge} and compress the new one.  Skipped, as Twisted skips
        a rotation it cannot do, while a compression runs or if the
        directory or the file is not writable.
        """
        if self.compressing():
            return
        if not (os.access(self.directory, os.W_OK) and os.access(self.path, os.W_OK)):
            return
        for number in reversed(self.listLogs()):
            for name in self._rotated(number):
                if self.maxRotatedFiles is not None and number >= self.maxRotatedFiles:
                    os.remove(name)
                else:
                    suffix = _GZ if name.endswith(_GZ) else ""
                    os.rename(name, "%s.%d%s" % (self.path, number + 1, suffix))
        self._file.close()
        os.rename(self.path, "%s.1" % (self.path,))
        # An OSError here (no descriptor left, in a connection flood) goes to
        # the writer; the file stays closed and the next write opens it.
        self._openFile()
        self.remove_expired()
        if self.compress:
            self._remove_partial()
            plain = ["%s.%d" % (self.path, number) for number in self.listLogs()
                     if os.path.exists("%s.%d" % (self.path, number))]
            if plain:
                self._compressor = threading.Thread(
                    target=_gzip_files, args=(plain,), name="anyproxy log compression")
                self._compressor.start()

    def _remove_partial(self):
        """Delete what a compression killed midway left (C{path.N.gz.tmp}); none runs now."""
        prefix, suffix = self.name + ".", _GZ + ".tmp"
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name.endswith(suffix):
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError:
                    pass

    def remove_expired(self):
        """Delete the rotated files last written more than C{maxAge} seconds ago."""
        if not self.maxAge:
            return
        oldest = time.time() - self.maxAge
        for number in self.listLogs():
            for name in self._rotated(number):
                try:
                    if os.path.getmtime(name) < oldest:
                        os.remove(name)
                except OSError:
                    pass  # gone already, or not ours to delete: the next rotation retries


# As Twisted does for LogFile (whose write is locked already, and calls rotate).
RotatingLogFile.synchronized = ["write", "rotate"]
threadable.synchronize(RotatingLogFile)


def _gzip_files(paths):
    """
    Gzip each of C{paths} to C{path.gz} (keeping its time, which C{maxAge}
    reads) and remove it.  A file that cannot be compressed is left as it
    is, for the next rotation to retry.
    """
    for path in paths:
        temporary = path + _GZ + ".tmp"
        try:
            # Readable by the owner only until it has the source's mode
            # (copystat): the log may hold what others should not read.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as raw, open(path, "rb") as source, \
                    gzip.GzipFile(fileobj=raw, mode="wb") as target:
                shutil.copyfileobj(source, target, 1024 * 1024)
            shutil.copystat(path, temporary)
            os.rename(temporary, path + _GZ)
            os.remove(path)
        except OSError:
            try:
                os.remove(temporary)
            except OSError:
                pass


def _open(log_config, twistd_logfile, nodaemon):
    """
    Where the log goes.  C{log.output: file} (or, when C{output} is absent,
    a C{log.file}) writes C{log.file}; otherwise twistd's choice holds:
    its C{--logfile} when given (a command line beats the file), else the
    console, C{stdout} or C{stderr} as C{log.output} says, when twistd
    runs in the foreground (C{-n}), else C{twistd.log} (a daemon has no
    console).
    """
    output = log_config.effective_output()
    if output == "file" and log_config.file:
        path = log_config.file
    elif twistd_logfile == "-":
        return sys.stdout
    elif twistd_logfile:
        path = twistd_logfile
    elif nodaemon:
        return sys.stderr if output == "stderr" else sys.stdout
    else:
        path = "twistd.log"
    # Rotated at log.max_size; a rotation deletes the files numbered
    # log.max_backups and above (path.1 is the newest), so at most that many
    # are kept, whatever an earlier run left (max_backups 0: all are kept),
    # and those older than log.max_age days.
    return RotatingLogFile.fromFullPath(path, rotateLength=log_config.max_size * _MB,
                                        maxRotatedFiles=log_config.max_backups or None,
                                        maxAge=log_config.max_age * _DAY,
                                        compress=log_config.compress)


def make_observer(log_config, twistd_logfile=None, nodaemon=True):
    """
    The observer for a L{anyproxy.config.model.LogConfig}.

    @param twistd_logfile: twistd's C{--logfile} value, used unless the
        config's output is a file (L{_open}).
    """
    stream = _open(log_config, twistd_logfile, nodaemon)
    if log_config.format == "json":
        observer = jsonFileLogObserver(stream)
    else:
        observer = FileLogObserver(stream, safe_classic_text)
    level = LEVELS[log_config.level]
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    filtering = FilteringLogObserver(RedactingObserver(observer), [predicate])
    filtering.level_predicate = predicate  # for set_log_level (reload)
    filtering.level_name = log_config.level  # for the level gate (LoggingRoot, emits)
    filtering.stream = stream  # the destination (tests close it)
    return filtering


def set_log_level(observer, level):
    """
    Change the level at once (config reload): of C{observer}, made by
    L{make_observer} (or C{None} when twistd's own logging is in use), and
    of the libraries that log through txaio.
    """
    predicate = getattr(observer, "level_predicate", None)
    if predicate is not None:
        predicate.setLogLevelForNamespace(None, LEVELS[level])
        if getattr(observer, "gates_levels", False):
            _gate(level)
    txaio.set_global_log_level(level)


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
            level = getattr(self.observer, "level_name", None)
            if level is not None:
                # Ours is the process's only observer: skip what it drops.
                self.observer.gates_levels = True
                _gate(level)

    def disownServiceParent(self):
        # No longer the process's observer: every level is built again.
        global _written
        if getattr(self.observer, "gates_levels", False):
            self.observer.gates_levels = False
            _written = None
        return super().disownServiceParent()
