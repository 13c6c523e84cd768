"""
A TCP relay on loopback that delays each direction by a fixed time: a WAN's
latency, without its loss or bandwidth limit, put on a tunnel connection.

    python benchmarks/delay_relay.py --listen PORT --to PORT --delay-ms 25

Each connection accepted on --listen is relayed to 127.0.0.1:--to; every
chunk read is written to the other side --delay-ms later, in order (a queue
per direction, one timer), so a round trip through the relay takes twice
--delay-ms more.  Reads are never paused: the relay is a pure delay line and
holds whatever is in flight (bandwidth x delay), like the path it stands for.
An EOF or close is passed on after the same delay.
"""

import argparse
import asyncio
import collections

HOST = "127.0.0.1"


class Direction:
    """One way through the relay: chunks wait DELAY, then go out in order."""

    def __init__(self, loop, delay):
        self.loop = loop
        self.delay = delay
        self.queue = collections.deque()  # (due, bytes or None for EOF)
        self.out = None  # the transport written to, once connected
        self.timer = None

    def push(self, data):
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None:
            self._arm()

    def _arm(self):
        if self.queue and self.out is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self._due)

    def _due(self):
        self.timer = None
        now = self.loop.time()
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, data = queue.popleft()
            if data is None:
                if self.out.can_write_eof():
                    self.out.write_eof()
                else:
                    self.out.close()
            else:
                self.out.write(data)
        self._arm()

    def attach(self, transport):
        self.out = transport
        if self.timer is None:
            self._arm()


class Side(asyncio.Protocol):
    def __init__(self, inbound, outbound):
        self.inbound = inbound  # what this side reads goes here
        self.outbound = outbound  # what this side writes comes from here
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.outbound.attach(transport)

    def data_received(self, data):
        self.inbound.push(data)

    def eof_received(self):
        self.inbound.push(None)
        return True

    def connection_lost(self, exc):
        self.inbound.push(None)


def serve(listen, to, delay):
    loop = asyncio.new_event_loop()

    class Downstream(Side):  # the accepted connection
        def connection_made(self, transport):
            super().connection_made(transport)
            transport = self.transport

            def failed(task):
                if task.exception() is not None:
                    transport.close()
            # Upstream's reads come back this way (outbound); it writes what we read (inbound).
            up = Side(self.outbound, self.inbound)
            loop.create_task(loop.create_connection(lambda: up, HOST, to)).add_done_callback(failed)

    def factory():
        return Downstream(Direction(loop, delay), Direction(loop, delay))

    server = loop.run_until_complete(loop.create_server(factory, HOST, listen))
    try:
        loop.run_forever()
    finally:
        server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one way, per direction")
    args = parser.parse_args()
    serve(args.listen, args.to, args.delay_ms / 1000.0)


if __name__ == "__main__":
    main()
