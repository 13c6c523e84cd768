"""
The measurements, one module each; ALL is the run order.

To add one: write a module here that ends with ``MEASUREMENT =
Measurement(...)`` (harness/measurement.py says what it gives), and add its
name to RUN_ORDER below.  The table and the chart go by each one's number,
not by this order.
"""

import importlib

# Throughput first; then the memory measurements, on a heap that has not yet
# held the 10,000 idle streams, which come last because they leave the most
# memory behind in the allocator.
RUN_ORDER = (
    "bulk",
    "http_requests",
    "connect",
    "udp",
    "tcp_ping_pong",
    "slow",
    "churn",
    "idle",
    "download",
    "many_tunnels",
    "origins",
    "page_load",
    "fleet_relay",
    "logins",
)

ALL = [importlib.import_module("measurements." + module).MEASUREMENT for module in RUN_ORDER]

BY_NAME = {m.name: m for m in ALL}


def select(only=()):
    """
    The measurements to run, in run order: those C{only} names (a name or
    an alias), or every one that runs by default.
    """
    if not only:
        return [m for m in ALL if m.by_default]
    return [m for m in ALL if m.name in only or any(a in only for a in m.aliases)]


def names():
    """Every name --only takes."""
    return list(BY_NAME) + [a for m in ALL for a in m.aliases if a not in BY_NAME]
