"""
AnyProxy: a reverse tunnel + HTTP/SOCKS5 proxy built on Twisted.

A gateway on a public host accepts proxy users; clients inside private networks
dial out to it over WebSocket + TLS and carry the users' streams to their targets.
"""

__version__ = "0.1.0"
