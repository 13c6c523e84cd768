"""The multiplexed stream protocol carried over WebSocket (docs/PROTOCOL.md)."""
