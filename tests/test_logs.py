"""Tests for L{anyproxy.logs}."""

import json
import os

from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger
from twisted.trial import unittest

from anyproxy.config import LogConfig
from anyproxy.logs import REDACTED, LoggingRoot, make_observer, redact


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
        LoggingRoot(observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)


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
        """A Basic or Bearer credential inside a text value is masked."""
        clean = redact({"line": "Proxy-Authorization: Basic YWxpY2U6cHc= next"})
        self.assertEqual(clean["line"], "Proxy-Authorization: Basic <redacted> next")

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
