# -*- test-case-name: tests.test_client_status -*-
"""
What the client's status page says of its tunnels: a tunnel protocol that
measures its round-trip time with WebSocket ping/pong, and a snapshot of
every tunnel the client keeps or is trying to keep.

The RTT is measured by the pings the client sends anyway (Liveness pings a
silent tunnel once an interval), plus one as soon as the tunnel is up, so a
new tunnel has a figure at once.  A busy tunnel is not pinged (its traffic
proves it alive), so its RTT is the last one measured, with its age.
"""

import struct

from anyproxy.client.gateway_endpoints import gateway_label
from anyproxy.tunnel.websocket import ClientTunnelProtocol


class MeasuredTunnelProtocol(ClientTunnelProtocol):
    """
    A L{ClientTunnelProtocol} keeping C{rtt} (seconds, or C{None} before
    the first pong), C{rtt_at} (when it was measured) and C{connected_at}
    (when the gateway accepted the tunnel), all on the factory's clock.
    """

    rtt = rtt_at = connected_at = None
    _pings = 0
    _ping_in_flight = None  # (payload, sent at) of our latest ping

    def hello_received(self, info):
        first = not self.ready.called
        super().hello_received(info)
        if first and self.ready.called:
            self.connected_at = self.factory.reactor.seconds()
            self.sendPing()

    def sendPing(self, payload=None):
        if payload is None:
            # Numbered, so that a late pong of an earlier ping is not
            # taken for this one's.
            self._pings += 1
            payload = struct.pack(">Q", self._pings)
            self._ping_in_flight = (payload, self.factory.reactor.seconds())
        super().sendPing(payload)

    def onPong(self, payload):
        super().onPong(payload)
        in_flight = self._ping_in_flight
        if in_flight is not None and payload == in_flight[0]:
            self._ping_in_flight = None
            now = self.factory.reactor.seconds()
            self.rtt, self.rtt_at = max(0.0, now - in_flight[1]), now


def tunnel_snapshot(root, now):
    """
    C{[{gateway, replica, state, ...}]}: every tunnel C{root} (a
    L{anyproxy.client.app.ClientRoot}) keeps, connected or not.
    """
    tunnels = []
    for key, services in sorted(root._tunnels.items(), key=lambda item: gateway_label(item[0])):
        factory = root.factories[key]
        for replica, service in enumerate(services, 1):
            endpoint = service.ready_endpoint
            tunnel = endpoint.tunnel
            up = tunnel is not None and tunnel in factory.connected
            entry = {
                "gateway": gateway_label(key), "replica": replica,
                "state": ("draining" if up and tunnel.mux.draining else
                          "connected" if up else "connecting"),
                "since": None, "connected_for": None, "rtt_ms": None, "rtt_age": None,
                "active_streams": None, "node": None, "last_error": None,
                "last_error_at": None,
            }
            if up:
                since = getattr(tunnel, "connected_at", None)
                rtt = getattr(tunnel, "rtt", None)
                entry.update(
                    since=since, connected_for=None if since is None else max(0.0, now - since),
                    rtt_ms=None if rtt is None else round(rtt * 1000.0, 2),
                    rtt_age=None if rtt is None else max(0.0, now - tunnel.rtt_at),
                    active_streams=tunnel.mux.stream_count,
                    node=getattr(tunnel, "gateway_node", None) or None)
            if endpoint.last_error is not None:
                entry["last_error_at"], entry["last_error"] = endpoint.last_error
            tunnels.append(entry)
    return tunnels


def open_ports_snapshot(root):
    """C{[{remote_port, protocol, target, gateway, state, error}]} for C{client.open_ports}."""
    ports = []
    for key, factory in sorted(root.factories.items(), key=lambda item: gateway_label(item[0])):
        answers = {answer.key: answer for answer in (factory.port_answers or ())}
        for port in factory.open_ports:
            answer = answers.get((port.remote_port, port.protocol))
            if not factory.connected:
                state = "no tunnel"
            elif factory.port_answers is None:
                state = "not answered"
            elif answer is None:
                state = "not answered"
            else:
                state = "open" if answer.ok else "refused"
            ports.append({
                "gateway": gateway_label(key), "remote_port": port.remote_port,
                "protocol": port.protocol,
                "target": "%s:%d" % (port.local_host, port.local_port), "state": state,
                "error": answer.error if answer is not None and not answer.ok else None})
    return ports
