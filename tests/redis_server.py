"""
A throwaway Redis for tests: Debian's C{/usr/bin/redis-server} on a free
loopback port, in a temporary directory, without persistence.

    server = yield RedisServer.started(self)     # stopped at cleanup
    server.url                                   # "redis://127.0.0.1:PORT/0"
    yield server.stop(); yield server.start()    # same port again
    yield server.kill()                          # SIGKILL, like a crash
"""

import shutil
import tempfile

from twisted.internet import defer, error, protocol, reactor, task

from tests.ports import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class _Watcher(protocol.ProcessProtocol):
    """Collects the server's output and fires C{ended} when it exits."""

    def __init__(self):
        self.output = []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class _Ping(protocol.Protocol):
    """Sends PING (after AUTH if needed); C{answered} fires with the first reply line."""

    def __init__(self, password):
        self.password = password
        self.answered = defer.Deferred()
        self.buffer = b""

    def connectionMade(self):
        command = b"PING\r\n"
        if self.password is not None:
            # Inline commands: the test password has no spaces.
            command = b"AUTH " + self.password.encode() + b"\r\n" + command
        self.transport.write(command)

    def dataReceived(self, data):
        self.buffer += data
        lines = self.buffer.split(b"\r\n")
        if self.password is not None:
            lines = lines[1:]
        if len(lines) > 1 and not self.answered.called:
            self.answered.callback(lines[0])
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.callback(b"")


class RedisServer:
    """
    One C{redis-server} process listening on 127.0.0.1 only.

    @ivar port: its TCP port, kept across L{stop} and L{start}.
    @ivar password: the C{requirepass} password, or C{None}.
    """

    def __init__(self, port=None, password=None, extra_args=(), start_timeout=10.0):
        self.port = port or free_port()
        self.password = password
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.directory = tempfile.mkdtemp(prefix="anyproxy-redis-")
        self._watcher = None

    @classmethod
    @defer.inlineCallbacks
    def started(cls, testcase, **kwargs):
        """Start a server whose process and directory C{testcase} cleans up."""
        server = cls(**kwargs)
        testcase.addCleanup(server.cleanup)
        yield server.start()
        return server

    @property
    def url(self):
        """C{redis://[:password@]127.0.0.1:PORT/0}."""
        auth = ":%s@" % (self.password,) if self.password is not None else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    @property
    def running(self):
        return self._watcher is not None and not self._watcher.ended.called

    def output(self):
        """What the server printed so far (for failure messages)."""
        if self._watcher is None:
            return ""
        return b"".join(self._watcher.output).decode("utf-8", "replace")

    def _args(self):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.directory, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    @defer.inlineCallbacks
    def start(self):
        """Start the process (on the same port as before) and wait until PING answers."""
        if self.running:
            raise RuntimeError("redis-server already running")
        self._watcher = watcher = _Watcher()
        reactor.spawnProcess(watcher, REDIS_SERVER, self._args(), env={}, path=self.directory)
        deadline = reactor.seconds() + self.start_timeout
        while True:
            if watcher.ended.called:
                raise RuntimeError("redis-server exited at start:\n" + self.output())
            if (yield self.ping()):
                return
            if reactor.seconds() > deadline:
                yield self.kill()
                raise RuntimeError("redis-server did not answer:\n" + self.output())
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def ping(self):
        """Whether the server answers PING now (C{True}/C{False}, never fails)."""
        creator = protocol.ClientCreator(reactor, _Ping, self.password)
        try:
            client = yield creator.connectTCP("127.0.0.1", self.port, timeout=1)
        except error.ConnectError:
            return False
        timeout = reactor.callLater(1, client.transport.abortConnection)
        try:
            line = yield client.answered
        except Exception:
            return False
        finally:
            if timeout.active():
                timeout.cancel()
        return line == b"+PONG"

    def _signal(self, name):
        watcher = self._watcher
        if watcher is None or watcher.ended.called:
            return defer.succeed(None)
        try:
            watcher.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass
        return watcher.ended

    def stop(self):
        """SIGTERM and wait for the exit (a Deferred); L{start} may follow."""
        return self._signal("TERM")

    def kill(self):
        """SIGKILL and wait for the exit (a Deferred); L{start} may follow."""
        return self._signal("KILL")

    @defer.inlineCallbacks
    def cleanup(self):
        """Kill the process if it runs and remove its directory."""
        yield self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
