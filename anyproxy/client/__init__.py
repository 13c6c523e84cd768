"""The private side: dials out to gateways, dials targets, enforces access control."""
