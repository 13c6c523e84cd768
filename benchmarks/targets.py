#!/usr/bin/env python3
"""
The benchmark's own targets, in one asyncio process (started by bench.py).

    python benchmarks/targets.py --host 127.0.0.1 --echo PORT --http PORT --source PORT [--udp-echo PORT]

- echo:   sends back whatever it receives (idle-stream and churn measurements);
- http:   answers every request with "200 OK" and a 2-byte body; keeps the
          connection open unless the request says "Connection: close"
          (request-rate measurement);
- source: sends an endless stream of bytes to whoever connects, respecting
          the socket's backpressure (slow-reader measurement);
- udp-echo: sends every UDP datagram back to where it came from (UDP
          measurement); large socket buffers, so that a burst of datagrams
          is not dropped here.

All listeners use a large backlog so that 10,000 connections opened quickly
are not dropped.  Prints "ready" on stdout once every port listens.
"""

import argparse
import asyncio
import resource
import socket
import sys

BACKLOG = 4096
# Asked for the UDP echo's socket buffers; the kernel may grant less.
UDP_BUFFER = 4 * 1024 * 1024
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


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def error_received(self, exc):
        pass  # e.g. ICMP "port unreachable" after a user went away


def udp_socket(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
        except OSError:
            pass
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def main(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    servers = []
    for factory, port in ((Echo, args.echo), (Http, args.http), (Source, args.source)):
        if port:
            servers.append(await loop.create_server(factory, args.host, port, backlog=BACKLOG,
                                                    reuse_address=True))
    if args.udp_echo:
        await loop.create_datagram_endpoint(UdpEcho, sock=udp_socket(args.host, args.udp_echo))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--echo", type=int, default=0)
    parser.add_argument("--http", type=int, default=0)
    parser.add_argument("--source", type=int, default=0)
    parser.add_argument("--udp-echo", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
