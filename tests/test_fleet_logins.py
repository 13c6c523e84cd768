# -*- test-case-name: tests.test_fleet_logins -*-
"""
Group logins (C{group_id:group_password}) across a fleet: a client on
gateway B announces its group password, and a user logs in with it on
gateway A (through the Redis registry, as salted verifiers, never the
password), and only while that client is connected.
"""

import socket

from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.redis_server import RedisServer
from tests.support import Echo, listen_tcp
from tests.test_e2e_tcp import recv_all, socks_connect
from tests.test_fleet_relay import Fleet, wait_until


class FleetGroupLoginTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_login_announced_on_b_works_on_a(self):
        server = yield RedisServer.started(self)
        fleet = Fleet(self, "a", "b", redis_url=server.url)
        a, b = yield fleet.start(gateway={"auth_groups": ["default", "lab"]})
        echo_port = listen_tcp(self, protocol.Factory.forProtocol(Echo)).getHost().port

        def login():
            sock = socks_connect(a.socks_port, "127.0.0.1", echo_port, username="lab",
                                 password="lab-group-pw")
            try:
                sock.sendall(b"with lab's login")
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)
            finally:
                sock.close()

        with self.assertRaises(Exception):
            yield deferToThread(login)  # nobody announced it yet
        client = yield b.start_client(group="lab", client={
            "client_id": "lab-1", "group_id": "lab", "group_password": "lab-group-pw"})
        yield fleet.listed(a, "lab", b)
        yield wait_until(lambda: a.node.registry.check_group_login("lab", "lab-group-pw"),
                         what="A to learn lab's login")
        self.assertEqual((yield deferToThread(login)), b"with lab's login")
        self.assertFalse(a.node.registry.check_group_login("lab", "wrong"))
        # Only verifiers travel: the password is in no record.
        keys = yield deferToThread(server_keys, server.port)
        self.assertNotIn("lab-group-pw", keys)
        yield client.stopService()
        yield wait_until(lambda: not a.node.registry.check_group_login("lab", "lab-group-pw"),
                         what="A to forget lab's login")
        with self.assertRaises(Exception):
            yield deferToThread(login)


def server_keys(port):
    """Every string value in the Redis at C{port}, concatenated (a raw RESP client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"KEYS *\r\n")
        data = sock.recv(65536)
        names = [line for line in data.split(b"\r\n") if line and line[:1] not in b"*$"]
        out = []
        for name in names:
            sock.sendall(b"DUMP " + name + b"\r\n")
            out.append(sock.recv(65536))
        return b"".join(out).decode("latin-1")
