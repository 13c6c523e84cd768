"""
Ports for the tests' listeners, reserved across trial workers.

A port handed out by binding port 0 and closing lies in the kernel's
ephemeral range: before the test listens on it, any outgoing connection of
any worker may take it as its source port ("Address already in use").  The
ports here come from below that range, and each stays reserved (an flock on a
file named after it) until the worker exits, so that no other worker listens
on it either, even while a gateway of this test is down between a kill and
its restart.
"""

import fcntl
import os
import random
import socket
import tempfile

_RESERVED = {}  # port -> the open lock file that holds it for this process
_RESERVATIONS = os.path.join(tempfile.gettempdir(), "anyproxy-test-ports")


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(each) for each in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port, hosts, kinds):
    for host in hosts:
        for kind in kinds:
            with socket.socket(socket.AF_INET, kind) as sock:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    return False
    return True


def free_port(hosts=("127.0.0.1",), udp=False):
    """
    A port free for TCP (and UDP if C{udp}) on every address of C{hosts},
    outside the ephemeral range, reserved for this process.
    """
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    low, high = _ephemeral_range()
    candidates = [port for port in range(20000, 32000) if not low <= port <= high]
    random.shuffle(candidates)
    os.makedirs(_RESERVATIONS, exist_ok=True)
    for port in candidates:
        if port in _RESERVED:
            continue
        lock = open(os.path.join(_RESERVATIONS, str(port)), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if not _bindable(port, hosts, kinds):
            lock.close()
            continue
        _RESERVED[port] = lock
        return port
    raise RuntimeError("no free port below the ephemeral range")


def free_ports(count, udp=True):
    """C{count} reserved ports free for TCP and UDP on 127.0.0.1, ascending."""
    return sorted(free_port(udp=udp) for _ in range(count))
