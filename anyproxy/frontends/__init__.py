"""User-facing proxy listeners on the gateway: SOCKS5 and HTTP."""
