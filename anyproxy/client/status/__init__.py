"""The client's own status page (C{client.status_addr}): tunnels, ACL refusals, open ports."""
