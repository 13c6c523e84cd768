"""Tests for L{anyproxy.logs}."""

import gzip
import json
import os
import sys
import threading
import time

import txaio
from autobahn.websocket.types import ConnectingRequest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from anyproxy import logs as logs_module
from anyproxy.config.model import LogConfig
from anyproxy.logs import (
    MAX_FIELD, REDACTED, LoggingRoot, RedactingLogger, RotatingLogFile, library_logger, make_observer,
    redact)

TOKEN = b"dHVubmVsLXVzZXI6czNjcmV0"  # base64 of "tunnel-user:s3cret"


class MakeObserverTests(unittest.TestCase):
    """The configured level, format and file."""

    def emit_all(self, config):
        observer = make_observer(config)
        log = Logger(observer=observer, namespace="test")
        log.debug("debug {n}", n=1)
        log.info("info {n}", n=2)
        log.error("error {n}", n=3)
        with open(config.file) as f:
            return f.read()

    def test_level_filters(self):
        """At level warn, debug and info events are dropped and errors kept."""
        path = self.mktemp()
        text = self.emit_all(LogConfig(level="warn", format="text", file=path))
        self.assertNotIn("debug 1", text)
        self.assertNotIn("info 2", text)
        self.assertIn("error 3", text)

    def test_json_lines(self):
        """The json format writes one JSON object per line with the event's fields."""
        path = self.mktemp()
        text = self.emit_all(LogConfig(level="debug", format="json", file=path))
        events = [json.loads(line) for line in text.replace("\x1e", "\n").splitlines() if line]
        self.assertEqual([e["n"] for e in events], [1, 2, 3])
        self.assertEqual(events[0]["log_namespace"], "test")

    def test_peer_text_cannot_forge_lines(self):
        """
        Control characters a peer sent are escaped in the text format (a
        new line stays a tab-indented continuation), and a huge field is
        cut, in both formats.
        """
        hostile = "evil\r\n2099-01-01T00:00:00+0000 [fake#critical] forged\x1b[2J\x85\u2028"
        for form in ("text", "json"):
            path = self.mktemp()
            log = Logger(observer=make_observer(LogConfig(level="info", format=form, file=path)),
                         namespace="test")
            log.info("asked for {host}", host=hostile)
            log.info("header {value}", value="x" * 3_000_000)
            with open(path) as f:
                text = f.read()
            self.assertLess(len(text), 4 * MAX_FIELD, form)  # JSON: the value and its flattened copy
            self.assertIn("more)", text)
            if form == "text":
                lines = text.splitlines()
                self.assertEqual(len(lines), 3, lines)  # two events, one continuation line
                self.assertTrue(lines[1].startswith("\t2099"), lines)
                self.assertNotRegex(text, "[\r\x1b\x85\u2028]")
                self.assertIn("evil\\x0d", text)
                self.assertIn("forged\\x1b[2J\\x85\\u2028", text)
            else:
                events = [json.loads(line) for line in text.replace("\x1e", "\n").splitlines()
                          if line]
                self.assertEqual(events[0]["host"], hostile)

    def test_twistd_logfile_used_without_config_file(self):
        """With no log.file, twistd's --logfile is the destination."""
        path = os.path.abspath(self.mktemp())
        observer = make_observer(LogConfig(level="info", format="text", file=None), path,
                                 nodaemon=False)
        Logger(observer=observer).info("to the twistd file")
        with open(path) as f:
            self.assertIn("to the twistd file", f.read())


class LoggingRootTests(unittest.TestCase):
    """twistd picks up the observer from the application."""

    def test_registers_component(self):
        """Joining an application registers the observer as its ILogObserver."""
        observer = make_observer(LogConfig(level="info", format="text", file=self.mktemp()))
        application = Application("test")
        root = LoggingRoot(observer)
        root.setServiceParent(application)
        self.addCleanup(root.disownServiceParent)
        self.assertIs(application.getComponent(ILogObserver), observer)

    def test_level_gate(self):
        """
        As the process's observer, events below its level are not even built
        (L{emits}); a reload's level applies; leaving the application ends it.
        """
        import txaio
        from twisted.logger import LogLevel
        from anyproxy.logs import emits, set_log_level
        self.addCleanup(txaio.set_global_log_level, txaio.get_global_log_level())
        observer = make_observer(LogConfig(level="warn", format="text", file=self.mktemp()))
        self.assertTrue(emits(LogLevel.info))  # not installed yet: everything is built
        root = LoggingRoot(observer)
        root.setServiceParent(Application("test"))
        self.addCleanup(lambda: root.disownServiceParent() if root.parent else None)
        self.assertFalse(emits(LogLevel.info))
        self.assertTrue(emits(LogLevel.warn))
        set_log_level(observer, "info")
        self.assertTrue(emits(LogLevel.info))
        self.assertFalse(emits(LogLevel.debug))
        root.disownServiceParent()
        self.assertTrue(emits(LogLevel.debug))


class RedactTests(unittest.TestCase):
    """Secrets never reach the log destination, even if code tried to log them."""

    def test_secret_fields(self):
        """Fields named like passwords, tokens or authorization headers are masked."""
        clean = redact({"log_format": "{password} {Proxy_Authorization} {user}",
                        "password": "hunter2", "Proxy_Authorization": "Basic abcd",
                        "user": "bob"})
        self.assertEqual((clean["password"], clean["Proxy_Authorization"], clean["user"]),
                         (REDACTED, REDACTED, "bob"))

    def test_credentials_in_text(self):
        """
        A Basic or Bearer credential inside a text value is masked; after a
        credential header's name, the whole value to the end of its line.
        """
        clean = redact({"line": "Proxy-Authorization: Basic YWxpY2U6cHc= next\nHost: h",
                        "other": "sent Bearer tok3n.x later", "cookie": "Cookie: a=1; b=2"})
        self.assertEqual(clean["line"], "Proxy-Authorization: Basic <redacted>\nHost: h")
        self.assertEqual(clean["other"], "sent Bearer <redacted> later")
        self.assertEqual(clean["cookie"], REDACTED)
        self.assertEqual(redact({"x": "Set-Cookie: sid=abc; Path=/"})["x"],
                         "Set-Cookie: <redacted>")

    def test_bytes(self):
        """A raw HTTP request in bytes (Autobahn's handshake dump) keeps its type, masked."""
        data = (b"GET /anyproxy HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic " + TOKEN +
                b"\r\nCookie: sid=s3cr3t\r\nUpgrade: websocket\r\n\r\n")
        clean = redact({"data": data, "view": bytearray(data)})
        self.assertEqual(clean["data"], b"GET /anyproxy HTTP/1.1\r\nHost: gw\r\nAuthorization: "
                                        b"Basic <redacted>\r\nCookie: <redacted>\r\n"
                                        b"Upgrade: websocket\r\n\r\n")
        self.assertEqual(clean["view"], clean["data"])

    def test_reprs(self):
        """Headers inside the repr of bytes or a dict end at the escaped line end or quote."""
        text = "%r %r" % (b"Authorization: Basic " + TOKEN + b"\r\nHost: gw",
                          {"authorization": "Basic " + TOKEN.decode()})
        clean = redact({"text": text})["text"]
        self.assertNotIn(TOKEN.decode(), clean)
        self.assertIn("\\r\\nHost: gw", clean)

    def test_header_containers(self):
        """Header dicts (str or bytes keys), header pairs and nested lists are masked."""
        clean = redact({"headers": {"authorization": "Basic " + TOKEN.decode(), "host": "gw",
                                    b"Cookie": b"sid=1"},
                        "pairs": [("Proxy-Authorization", "Basic x"), ("Host", "gw")],
                        "nested": ({"x": ["Authorization: Bearer abcdef"]},)})
        self.assertEqual(clean["headers"], {"authorization": REDACTED, "host": "gw",
                                            b"Cookie": REDACTED})
        self.assertEqual(clean["pairs"], [("Proxy-Authorization", REDACTED), ("Host", "gw")])
        self.assertEqual(clean["nested"], ({"x": ["Authorization: Bearer <redacted>"]},))

    def test_objects(self):
        """
        Autobahn's request objects (their headers) and any object whose text
        shows a credential are masked; others pass untouched.
        """
        request = ConnectingRequest(host="gw", port=443, resource="/anyproxy",
                                    headers={"Authorization": "Basic " + TOKEN.decode()})
        marker = object()
        clean = redact({"request": request, "error": ValueError("bad Basic " + TOKEN.decode()),
                        "plain": marker, "n": 3})
        self.assertEqual(clean["request"]["headers"], {"Authorization": REDACTED})
        self.assertEqual(clean["error"], "bad Basic <redacted>")
        self.assertIs(clean["plain"], marker)
        self.assertEqual(clean["n"], 3)

    def test_url_passwords(self):
        """
        The password in a URL's user information is masked, to the
        authority's last C{@}; the scheme, user name and host stay.
        """
        clean = redact({"a": "redis://:hunter2@10.0.0.1:6379/0",
                        "b": b"via http://bob:p@ss@proxy:3128 failed",
                        "c": "http://host:8080/a@b?x=y:z@w"})
        self.assertEqual(clean["a"], "redis://:<redacted>@10.0.0.1:6379/0")
        self.assertEqual(clean["b"], b"via http://bob:<redacted>@proxy:3128 failed")
        self.assertEqual(clean["c"], "http://host:8080/a@b?x=y:z@w")
        self.assertEqual(redact({"d": "http://[::1]:80@x"})["d"], "http://[::1]:80@x")

    def test_masking_time_is_linear(self):
        """
        Text a peer chooses ("a.a.a...", where every letter could start a
        URL's scheme) is masked in time in proportion to its length.
        """
        started = time.monotonic()
        logs_module._scrub_text("a." * 20000)
        self.assertLess(time.monotonic() - started, 1.0)  # 3 s when it was quadratic

    def test_long_field_cut_before_masking(self):
        """A long field is masked on its first 16 KiB only, then cut as before."""
        seen = []
        scrub = logs_module._scrub_text
        self.patch(logs_module, "_scrub_text", lambda text: (seen.append(len(text)), scrub(text))[1])
        clean = redact({"target": "http://x/" + "a" * 1000000})["target"]
        self.assertEqual(max(seen), 4 * MAX_FIELD)
        self.assertTrue(clean.endswith(" ... (%d more)" % (1000009 - MAX_FIELD,)))

    def test_failure_text(self):
        """
        A failure whose exception quotes a credential is written with that
        text masked (Twisted's JSON format leaves the text out), and keeps its type;
        the caller's failure is left as it was.
        """
        url = "redis://:%s@10.0.0.1:6379/0" % ("hunter2",)
        try:
            raise ConnectionError("cannot reach " + url)
        except ConnectionError:
            failure = Failure()
        for format in ("text", "json"):
            path = self.mktemp()
            observer = make_observer(LogConfig(level="info", format=format, file=path))
            Logger(observer=observer).failure("registry lost", failure)
            with open(path) as f:
                text = f.read()
            self.assertIn("ConnectionError", text)
            self.assertNotIn("hunter2", text)
            if format == "text":
                self.assertIn("redis://:<redacted>@10.0.0.1", text)
        self.assertIn("hunter2", str(failure.value))
        plain = Failure(ValueError("nothing secret"))
        self.assertIs(redact({"log_failure": plain})["log_failure"], plain)

    def test_format_string(self):
        """A credential in the format string itself is masked too."""
        clean = redact({"log_format": "got Authorization: Basic " + TOKEN.decode()})
        self.assertNotIn(TOKEN.decode(), clean["log_format"])

    def test_destination_sees_redacted(self):
        """The configured observer writes the redacted text."""
        path = self.mktemp()
        observer = make_observer(LogConfig(level="info", format="text", file=path))
        Logger(observer=observer).info("auth {h} with {password}", h="Bearer tok3n.x",
                                       password="pw123")
        with open(path) as f:
            text = f.read()
        self.assertNotIn("tok3n", text)
        self.assertNotIn("pw123", text)


class LibraryLoggerTests(unittest.TestCase):
    """Autobahn's events are masked as they are made, for every observer."""

    def setUp(self):
        txaio.use_twisted()  # as twistd startup does (apply_library_levels)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(txaio.set_global_log_level, txaio.get_global_log_level())

    def test_every_observer_sees_masked_events(self):
        """An observer of the global publisher gets the event already masked."""
        txaio.set_global_log_level("debug")
        library_logger("autobahn.test").debug("received HTTP request:\n\n{data}\n\n",
                                               data=b"Authorization: Basic " + TOKEN)
        [event] = [e for e in self.events if e.get("log_namespace") == "autobahn.test"]
        self.assertEqual(event["data"], b"Authorization: Basic <redacted>")
        self.assertNotIn(TOKEN.decode(), formatEvent(event))

    def test_follows_txaio_level(self):
        """Below the global txaio level its methods stay no-ops (nothing is emitted)."""
        logger = library_logger("autobahn.test")
        txaio.set_global_log_level("info")
        logger.debug("quiet {data}", data=b"x")
        txaio.set_global_log_level("debug")
        logger.debug("loud {data}", data=b"x")
        self.assertEqual([e["log_format"] for e in self.events
                          if e.get("log_namespace") == "autobahn.test"], ["loud {data}"])

    def test_tunnel_protocols_use_it(self):
        """Both ends' Autobahn protocols log through a masking logger."""
        from anyproxy.tunnel.websocket import ClientTunnelProtocol, GatewayTunnelProtocol
        for cls in (ClientTunnelProtocol, GatewayTunnelProtocol):
            self.assertIsInstance(cls.log._logger, RedactingLogger)


class RotationTests(unittest.TestCase):
    """log.max_size and log.max_backups bound the files a log leaves."""

    def test_at_most_max_backups(self):
        """
        After many rotations (and with stale files from an unbounded run),
        at most max_backups rotated files remain, the newest ones.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "anyproxy.log")
        for number in range(1, 31):  # what an earlier run without a bound left
            with open("%s.%d" % (path, number), "w") as f:
                f.write("stale\n")
        observer = make_observer(LogConfig(level="info", format="text", file=path,
                                           max_size=2, max_backups=3))
        self.addCleanup(observer.stream.close)
        self.assertEqual(observer.stream.rotateLength, 2 * 1024 * 1024)
        observer.stream.rotateLength = 200  # rotate every few lines, not every 2 MB
        log = Logger(observer=observer)
        for n in range(500):
            log.info("line {n}", n=n)
        rotated = sorted(name for name in os.listdir(directory) if name != "anyproxy.log")
        self.assertEqual(rotated, ["anyproxy.log.1", "anyproxy.log.2", "anyproxy.log.3"])
        texts = []
        for name in ["anyproxy.log"] + rotated:
            with open(os.path.join(directory, name)) as f:
                texts.append(f.read())
        self.assertNotIn("stale", "".join(texts))
        self.assertIn("line 499", texts[0])  # newest first: current, .1, .2, .3
        numbers = [int(text.rsplit("line ", 1)[1].split()[0]) for text in texts]
        self.assertEqual(numbers, sorted(numbers, reverse=True))

    def test_zero_keeps_all(self):
        """max_backups 0 means no limit."""
        observer = make_observer(LogConfig(level="info", format="text", file=self.mktemp(),
                                           max_backups=0))
        self.addCleanup(observer.stream.close)
        self.assertIsNone(observer.stream.maxRotatedFiles)


def _rotated_names(directory, current="anyproxy.log"):
    return sorted(name for name in os.listdir(directory) if name != current)


def _gunzip_text(path):
    with gzip.open(path, "rt") as f:
        return f.read()


class MaxAgeCompressTests(unittest.TestCase):
    """log.max_age and log.compress, on top of Twisted's size rotation."""

    def log_file(self, **kwargs):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        log = RotatingLogFile("anyproxy.log", directory, **kwargs)
        self.addCleanup(log.close)
        self.addCleanup(log.wait_for_compression)
        return directory, log

    def test_compressed_and_counted(self):
        """
        Rotated files are gzipped (whole, readable, newest first) and
        max_backups counts them: at most that many, gzipped or not.
        """
        directory, log = self.log_file(rotateLength=100, maxRotatedFiles=3, compress=True)
        for number in range(1, 4):  # an earlier run's files, one of them plain
            with open(os.path.join(directory, "anyproxy.log.%d%s" % (
                    number, "" if number == 1 else ".gz")), "wb") as f:
                f.write(b"stale\n" if number == 1 else gzip.compress(b"stale\n"))
        for n in range(60):
            log.write("line %d %s\n" % (n, "x" * 20))
            log.wait_for_compression()
        self.assertEqual(_rotated_names(directory),
                         ["anyproxy.log.1.gz", "anyproxy.log.2.gz", "anyproxy.log.3.gz"])
        texts = [_gunzip_text(os.path.join(directory, "anyproxy.log.%d.gz" % (number,)))
                 for number in (1, 2, 3)]
        self.assertNotIn("stale", "".join(texts))
        numbers = [int(text.split()[1]) for text in texts]
        self.assertEqual(numbers, sorted(numbers, reverse=True))
        self.assertLess(numbers[0], 59)  # the newest lines are in the current file

    def test_rotation_waits_for_compression(self):
        """
        While a rotated file is being compressed, the current file grows past
        the size; the first write after the thread is done rotates.
        """
        release = threading.Event()
        real = logs_module._gzip_files

        def slow_gzip(paths):
            release.wait(10)
            real(paths)

        self.patch(logs_module, "_gzip_files", slow_gzip)
        self.addCleanup(release.set)
        directory, log = self.log_file(rotateLength=50, compress=True)
        log.write("a" * 60 + "\n")
        log.write("b\n")  # rotates: a... is being compressed
        log.write("c" * 60 + "\n")
        log.write("d\n")  # due, but waits for the compression
        self.assertTrue(log.compressing())
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1"])
        release.set()
        log.wait_for_compression()
        log.write("e\n")
        log.wait_for_compression()
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1.gz", "anyproxy.log.2.gz"])
        self.assertEqual(_gunzip_text(os.path.join(directory, "anyproxy.log.1.gz")),
                         "b\n" + "c" * 60 + "\nd\n")
        with open(log.path) as f:
            self.assertEqual(f.read(), "e\n")

    def test_interrupted_compression(self):
        """
        What a killed compression left (the plain file and a partial
        .gz.tmp) is compressed and cleaned up at the next rotation.
        """
        directory, log = self.log_file(rotateLength=10, compress=True)
        for name, data in [("anyproxy.log.1", b"left plain\n"),
                           ("anyproxy.log.1.gz.tmp", b"\x1f\x8b partial")]:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        log.write("0123456789\n")
        log.write("next\n")
        log.wait_for_compression()
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1.gz", "anyproxy.log.2.gz"])
        self.assertEqual(_gunzip_text(os.path.join(directory, "anyproxy.log.2.gz")),
                         "left plain\n")

    def test_compression_keeps_the_time(self):
        """A gzipped file keeps its plain file's time, which max_age reads."""
        directory, log = self.log_file(rotateLength=10, compress=True)
        log.write("first line\n")
        os.utime(log.path, (1000000000, 1000000000))
        log.write("x\n")
        log.wait_for_compression()
        self.assertEqual(os.path.getmtime(log.path + ".1.gz"), 1000000000)

    def test_max_age(self):
        """
        Rotated files last written more than max_age ago are deleted, gzipped
        or not, at start and at each rotation; newer ones and the current
        file stay.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "anyproxy.log")
        old = time.time() - 3 * 86400
        for name, when in [("anyproxy.log", old), ("anyproxy.log.1", None),
                           ("anyproxy.log.2.gz", old), ("anyproxy.log.3", old),
                           ("anyproxy.log.backup", old)]:
            with open(os.path.join(directory, name), "w") as f:
                f.write("x\n")
            if when:
                os.utime(os.path.join(directory, name), (when, when))
        log = RotatingLogFile.fromFullPath(path, rotateLength=10, maxAge=2 * 86400)
        self.addCleanup(log.close)
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1", "anyproxy.log.backup"])
        os.utime(path + ".1", (old, old))  # now past max_age
        log.write("0123456789\n")
        log.write("next\n")  # rotates: the current file (just written) to .1, .1 to .2, deleted
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1", "anyproxy.log.backup"])

    def test_zero_max_age_keeps_all(self):
        """max_age 0 deletes nothing for its age."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "anyproxy.log.1"), "w") as f:
            f.write("x\n")
        os.utime(os.path.join(directory, "anyproxy.log.1"), (0, 0))
        log = RotatingLogFile.fromFullPath(os.path.join(directory, "anyproxy.log"), maxAge=0)
        self.addCleanup(log.close)
        self.assertEqual(_rotated_names(directory), ["anyproxy.log.1"])

    def test_from_config(self):
        """make_observer passes max_age (days) and compress on."""
        observer = make_observer(LogConfig(file=self.mktemp(), max_age=7, compress=True))
        self.addCleanup(observer.stream.close)
        self.assertIsInstance(observer.stream, RotatingLogFile)
        self.assertEqual((observer.stream.maxAge, observer.stream.compress), (7 * 86400, True))


class OutputTests(unittest.TestCase):
    """log.output: the console stream, or the file, and twistd's --logfile."""

    def stream(self, twistd_logfile=None, nodaemon=True, **kwargs):
        observer = make_observer(LogConfig(**kwargs), twistd_logfile, nodaemon=nodaemon)
        if observer.stream not in (sys.stdout, sys.stderr):
            self.addCleanup(observer.stream.close)
        return observer.stream

    def test_console(self):
        """In the foreground, stdout (the default) or stderr."""
        self.assertIs(self.stream(), sys.stdout)
        self.assertIs(self.stream(output="stdout"), sys.stdout)
        self.assertIs(self.stream(output="stderr"), sys.stderr)

    def test_file_only_with_output_file(self):
        """log.file is written when output is file or absent, not with stdout/stderr."""
        path = os.path.abspath(self.mktemp())
        self.assertEqual(self.stream(file=path).path, path)
        self.assertEqual(self.stream(file=path, output="file").path, path)
        unused = os.path.abspath(self.mktemp())
        self.assertIs(self.stream(file=unused, output="stdout"), sys.stdout)
        self.assertIs(self.stream(file=unused, output="stderr"), sys.stderr)
        self.assertFalse(os.path.exists(unused))

    def test_twistd_logfile(self):
        """
        twistd's --logfile beats output stdout/stderr (a command line beats
        the file), and a daemon has no console: twistd.log.
        """
        path = os.path.abspath(self.mktemp())
        self.assertEqual(self.stream(path, output="stderr").path, path)
        self.assertEqual(self.stream(path, nodaemon=False).path, path)
        self.assertIs(self.stream("-", output="stderr"), sys.stdout)
        self.assertEqual(self.stream(path, file=path + ".mine").path, path + ".mine")
        self.assertEqual(os.path.basename(self.stream(nodaemon=False, output="stderr").path),
                         "twistd.log")
