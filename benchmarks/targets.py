#!/usr/bin/env python3
"""
The benchmark's own targets, in one asyncio process (started by bench.py).

    python benchmarks/targets.py --host 127.0.0.1 --echo PORT --http PORT --source PORT

- echo:   sends back whatever it receives (idle-stream and churn measurements);
- http:   answers every request with "200 OK" and a 2-byte body; keeps the
          connection open unless the request says "Connection: close"
          (request-rate measurement);
- source: sends an endless stream of bytes to whoever connects, respecting
          the socket's backpressure (slow-reader measurement).

All listeners use a large backlog so that 10,000 connections opened quickly
are not dropped.  Prints "ready" on stdout once every port listens.
"""

import argparse
import asyncio
import resource
import sys

BACKLOG = 4096
CHUNK = b"\xa5" * (256 * 1024)
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 2\r\n%s\r\nok")


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False  # close once our side is written


class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4:]
            close = b"connection: close" in head or head.endswith(b"http/1.0")
            self.transport.write(HTTP_RESPONSE % (b"Connection: close\r\n" if close else b""))
            if close:
                self.transport.close()
                return


class Source(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.paused = False
        self.closed = False
        self._push()

    def _push(self):
        while not self.paused and not self.closed and not self.transport.is_closing():
            self.transport.write(CHUNK)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        asyncio.get_running_loop().call_soon(self._push)

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.closed = True


async def main(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    servers = []
    for factory, port in ((Echo, args.echo), (Http, args.http), (Source, args.source)):
        if port:
            servers.append(await loop.create_server(factory, args.host, port, backlog=BACKLOG,
                                                    reuse_address=True))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--echo", type=int, default=0)
    parser.add_argument("--http", type=int, default=0)
    parser.add_argument("--source", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
