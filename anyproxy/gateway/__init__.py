"""The public side: accepts client tunnels and proxy users, routes streams."""
