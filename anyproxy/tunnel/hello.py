# -*- test-case-name: tests.test_hello -*-
"""
The HELLO: the JSON object each end of a tunnel sends first, on stream 0
(docs/PROTOCOL.md, "Session setup: HELLO").  Its fields, their limits, and
how each side builds and reads it, for both sides.

Sans-I/O: plain values in and out, no Twisted and no logging.

The client builds its HELLO with L{client_hello}.  The gateway checks it
with L{read_client_hello}, which gives a L{ClientHello} or raises
L{HelloRefused} with C{CLOSE_BAD_HELLO} and a reason both sides log.
Whether the client's credential may serve what the HELLO asks (its group,
client id and tunnel count) is a question for the gateway's tunnel server,
not for this module.  The gateway answers with L{gateway_hello}, and it may
send further HELLOs later (a port handed over to a waiting client).  The
client reads them all with L{read_gateway_hello}, which refuses nothing:
the gateway has already accepted the tunnel.

C{open_ports} (port forwarding): the client asks for gateway ports with
L{PortRequest} entries, and the gateway answers each entry with a
L{PortAnswer} (L{port_answer}).  Each entry is read on its own: a malformed
one becomes a L{BadPortRequest}, which is refused by itself in the answer
and never refuses the HELLO, so a client with one bad entry still serves
the others and its proxy traffic.

C{fleet} (a gateway of a fleet, C{gateway.fleet}): the gateway's HELLO
names its node (C{node}) and lists the fleet's tunnel addresses as
L{FleetNode}s (L{fleet_list}); the client attaches to some of them
(L{anyproxy.client.attachment}).  A gateway without a fleet sends neither
key.

C{routes} (C{client.routes}, docs/ROUTES.md): the networks and names the
client can reach, as texts (L{read_routes}).  A client announcing none
serves anything.  A bad entry refuses the HELLO: dropping it would route
less than the client's operator wrote, and dropping every entry would make
the client serve anything.

Unknown keys are ignored in both directions, so later versions can
announce more.
"""

import json

import attr

from anyproxy import __version__
from anyproxy.addresses import dial_address, host_port
from anyproxy.auth import DEFAULT_GROUP
from anyproxy.errors import HelloRefused
from anyproxy.routes import Routes
from anyproxy.tunnel.frames import CLOSE_BAD_HELLO, MAX_HOST_LENGTH

# The HELLO's C{version}; a gateway refuses any other.
PROTOCOL_VERSION = 1
# The C{software} each side announces, for the other's logs and status page.
SOFTWARE = "anyproxy/" + __version__
# C{client_id} and C{group} are names in logs, metrics and the status page.
MAX_ID_LENGTH = 128
# C{weight} is a share of the group's new streams, relative to the other
# clients' weights: 0.01 to 10000 spans every useful ratio without letting a
# client starve or swamp a group with an extreme value.
MIN_WEIGHT = 0.01
MAX_WEIGHT = 10000
# C{group_password}: the gateway keeps a keyed digest of it; the bound keeps
# the HELLO small.  The client's config refuses values outside these limits
# before a gateway can refuse the HELLO.
MAX_GROUP_PASSWORD = 1024
# What a forwarded port carries.
PORT_PROTOCOLS = ("tcp", "udp")
# The fleet list: at most this many nodes are sent and read, and the list's
# JSON stays within this many bytes, so that a HELLO with both a fleet list
# and open_ports answers fits in one HELLO frame (frames.MAX_HELLO, 16 KiB).
# Dozens of gateways fit; a client attaches to a few of them anyway.
MAX_FLEET_NODES = 64
MAX_FLEET_BYTES = 8 * 1024
# client.routes: at most this many entries and this many bytes of JSON, so
# that the client's HELLO with its open_ports fits in one HELLO frame
# (frames.MAX_HELLO, 16 KiB).  Hundreds of sites' networks fit; the
# client's config refuses more before a gateway can refuse the HELLO.
MAX_ROUTES = 256
MAX_ROUTES_BYTES = 8 * 1024


def _refuse(reason):
    return HelloRefused(CLOSE_BAD_HELLO, reason)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# -- open_ports -------------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class PortRequest:
    """
    One C{open_ports} entry: the gateway is asked to listen on
    C{remote_port}/C{protocol} and forward to C{local_host:local_port} as
    the client sees it.
    """

    remote_port = attr.ib()
    local_host = attr.ib()
    local_port = attr.ib()
    protocol = attr.ib(default="tcp")

    @property
    def key(self):
        """C{(remote_port, protocol)}: what the gateway's answer is keyed on."""
        return (self.remote_port, self.protocol)

    @property
    def label(self):
        """C{'9001/tcp'}, as logs and answers name the port."""
        return "%d/%s" % self.key

    @property
    def target(self):
        """C{local_host:local_port}, for logs."""
        return host_port(self.local_host, self.local_port)

    def to_json(self):
        """The entry as the client's HELLO carries it."""
        return {"remote_port": self.remote_port, "local_host": self.local_host,
                "local_port": self.local_port, "protocol": self.protocol}


@attr.s(frozen=True, slots=True)
class BadPortRequest:
    """
    An C{open_ports} entry that is not a valid L{PortRequest}.  The gateway
    refuses it in its answer, naming C{remote_port} and C{protocol} when the
    entry has usable ones (else C{None}).

    @ivar problem: what is wrong, naming the field.
    """

    remote_port = attr.ib()
    protocol = attr.ib()
    problem = attr.ib()


def _port_field(item, key):
    value = item.get(key)
    if not _is_int(value) or not 1 <= value <= 65535:
        raise ValueError("%s must be a port number 1..65535, got %s" % (key, _short(value)))
    return value


def parse_port_request(item):
    """
    A L{PortRequest} from one C{open_ports} entry of a client's HELLO.

    @param item: the entry, a JSON value.
    @raise ValueError: naming the bad field.
    """
    if not isinstance(item, dict):
        raise ValueError("entry must be an object, got %r" % (type(item).__name__,))
    remote_port = _port_field(item, "remote_port")
    local_port = _port_field(item, "local_port")
    local_host = item.get("local_host")
    if not isinstance(local_host, str):
        raise ValueError("local_host must be a string")
    if not local_host.isprintable() or " " in local_host:
        # Logged with every forwarded connection: no control characters.
        raise ValueError("local_host %s is not a valid host name" % (_short(local_host),))
    try:
        encoded = local_host.encode("ascii") if local_host.isascii() else local_host.encode("idna")
    except UnicodeError:
        raise ValueError("local_host %s is not a valid host name" % (_short(local_host),)) from None
    if not 1 <= len(encoded) <= MAX_HOST_LENGTH:
        # The tunnel's OPEN carries host names of 1..255 bytes.
        raise ValueError("local_host must be 1..%d bytes" % (MAX_HOST_LENGTH,))
    protocol = item.get("protocol", "tcp")
    if protocol not in PORT_PROTOCOLS:
        raise ValueError("protocol must be tcp or udp, got %s" % (_short(protocol),))
    return PortRequest(remote_port, local_host, local_port, protocol)


def read_port_request(item):
    """
    One C{open_ports} entry as a L{PortRequest}, or a L{BadPortRequest}
    saying why not; never raises.  An entry already read is returned as it is.
    """
    if isinstance(item, (PortRequest, BadPortRequest)):
        return item
    try:
        return parse_port_request(item)
    except ValueError as e:
        item = item if isinstance(item, dict) else {}
        port, protocol = item.get("remote_port"), item.get("protocol", "tcp")
        return BadPortRequest(port if _is_int(port) else None,
                              protocol if isinstance(protocol, str) else None, str(e))


def read_open_ports(value):
    """
    A HELLO's C{open_ports} value, entry by entry (L{read_port_request}).

    @return: C{None} when nothing was asked (C{value} is C{None}); else a
        tuple of L{PortRequest}s and L{BadPortRequest}s in the order asked,
        empty when C{value} is not a list.
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(read_port_request(item) for item in value)


@attr.s(frozen=True, slots=True)
class PortAnswer:
    """
    The gateway's answer to one C{open_ports} entry, as the client reads it.

    @ivar remote_port: the entry's port, or C{None} if it had no usable one.
    @ivar protocol: the entry's protocol, or C{None}.
    @ivar ok: whether the gateway listens on the port for this client.
    @ivar error: why not, when not C{ok}.
    """

    remote_port = attr.ib()
    protocol = attr.ib()
    ok = attr.ib(default=False)
    error = attr.ib(default="")

    @property
    def key(self):
        """C{(remote_port, protocol)}, as L{PortRequest.key}."""
        return (self.remote_port, self.protocol)

    def to_json(self):
        """The answer as the gateway's HELLO carries it."""
        return {"remote_port": self.remote_port, "protocol": self.protocol, "ok": self.ok,
                "error": self.error}

    @classmethod
    def from_json(cls, entry):
        """An answer from a gateway's HELLO; what is not of the right type reads as absent."""
        entry = entry if isinstance(entry, dict) else {}
        port, protocol, error = entry.get("remote_port"), entry.get("protocol"), entry.get("error")
        return cls(port if _is_int(port) else None,
                   protocol if isinstance(protocol, str) else None,
                   entry.get("ok") is True, error if isinstance(error, str) else "")


def port_answer(entry, ok, error=""):
    """
    The JSON answer to one entry of a client's C{open_ports}.

    @param entry: a L{PortRequest} or L{BadPortRequest}, or a raw entry.
    @param ok: whether the port is open for the client.
    @param error: why not, when not C{ok}.
    """
    entry = read_port_request(entry)
    return PortAnswer(entry.remote_port, entry.protocol, ok, error).to_json()


def refuse_all(requested, why):
    """
    The C{open_ports} answer refusing every entry of C{requested} (a HELLO's
    C{open_ports}, raw or read), or C{None} when nothing was asked.
    """
    entries = read_open_ports(requested)
    if entries is None:
        return None
    return [port_answer(entry, False, why) for entry in entries]


# -- the client's HELLO -----------------------------------------------------------


@attr.s(frozen=True, slots=True)
class ClientHello:
    """
    A client's HELLO, checked (L{read_client_hello}).

    @ivar weight: a float from L{MIN_WEIGHT} to L{MAX_WEIGHT}.
    @ivar group_password: C{""} when none was announced.
    @ivar software: what the client says it runs, for logs and status.
    @ivar open_ports: C{None} when the client asked for no ports, else what
        L{read_open_ports} read.
    @ivar open_ports_not_a_list: the HELLO's C{open_ports} was present but
        not a list; it then asks for nothing (C{open_ports} is empty).
    @ivar routes: what the client can reach (L{read_routes}), a
        L{anyproxy.gateway.pac.Routes}; C{None} when it announced none and
        serves anything.
    """

    client_id = attr.ib()
    group = attr.ib(default=DEFAULT_GROUP)
    weight = attr.ib(default=1.0)
    group_password = attr.ib(default="", repr=False)
    software = attr.ib(default="")
    open_ports = attr.ib(default=None)
    open_ports_not_a_list = attr.ib(default=False)
    routes = attr.ib(default=None)


def client_hello(client_id, group=DEFAULT_GROUP, weight=1.0, group_password="", open_ports=(),
                 software=SOFTWARE, routes=()):
    """
    The client's HELLO.

    @param weight: the client's share of its group's new streams; sent as an
        integer when it is a whole number.
    @param group_password: sent only when set.
    @param open_ports: what to ask the gateway to forward: objects with
        C{remote_port}, C{local_host}, C{local_port} and C{protocol}
        (L{PortRequest}s or C{client.open_ports} config entries); the key is
        sent only when there are some.
    @param routes: C{client.routes}, route texts; sent only when there are some.
    @return: a dict for L{anyproxy.tunnel.frames.Hello}.
    """
    info = {"version": PROTOCOL_VERSION, "client_id": client_id, "group": group,
            "software": software,
            "weight": int(weight) if weight == int(weight) else weight}
    if group_password:
        info["group_password"] = group_password
    if open_ports:
        info["open_ports"] = [
            PortRequest(port.remote_port, port.local_host, port.local_port, port.protocol).to_json()
            for port in open_ports]
    if routes:
        info["routes"] = list(routes)
    return info


def id_problem(value):
    """
    Why C{value} cannot be a client or group id in a HELLO, or C{None}: the
    gateway's rule, which the client's config applies too.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        return "must be a string of 1..%d characters" % (MAX_ID_LENGTH,)
    # Ids go into logs, metric labels, the status page and close reasons:
    # no control characters, and no lone surrogates (not encodable as UTF-8).
    if not value.isprintable():
        return "must be printable text"
    if value in (".", ".."):
        # A path segment in the management API's URLs (api/clients/ID/drain):
        # a browser resolves "..", and the status page's button for this
        # client would act on the gateway instead (POST api/drain).
        return "must not be %r" % (value,)
    return None


def _text(info, key, default):
    value = info.get(key, default)
    problem = id_problem(value)
    if problem is not None:
        raise _refuse("HELLO field %r %s" % (key, problem))
    return value


def _weight(info):
    value = info.get("weight", 1)
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise _refuse("HELLO field 'weight' must be a number from %g to %d"
                      % (MIN_WEIGHT, MAX_WEIGHT))
    return float(value)


def _group_password(info):
    # The reason never quotes the value: it is a password.
    value = info.get("group_password", "")
    if not isinstance(value, str) or len(value) > MAX_GROUP_PASSWORD or not _utf8(value):
        raise _refuse("HELLO field 'group_password' must be a string of at most %d characters"
                      % (MAX_GROUP_PASSWORD,))
    return value


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        return False
    return True


def _short(value):
    """A value for a close reason (120 bytes in all): its repr, cut."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_routes(value):
    """
    A HELLO's C{routes} value: a L{Routes}, or C{None} when it is absent or
    empty (the client serves anything).

    @raise HelloRefused: with C{CLOSE_BAD_HELLO} when it is not a list of
        route texts (CIDRs, names, C{*.domain} patterns), or holds more than
        L{MAX_ROUTES} entries or L{MAX_ROUTES_BYTES} bytes of JSON; the
        reason names the first bad entry.
    """
    if value is None:
        return None
    if not isinstance(value, list):
        raise _refuse("HELLO field 'routes' must be a list of strings")
    if len(value) > MAX_ROUTES or len(json.dumps(value)) > MAX_ROUTES_BYTES:
        raise _refuse("HELLO field 'routes' must hold at most %d entries and %d bytes"
                      % (MAX_ROUTES, MAX_ROUTES_BYTES))
    for index, entry in enumerate(value):
        try:
            if not isinstance(entry, str) or not entry.isprintable():
                raise ValueError(entry)
            Routes.of([entry])
        except ValueError:
            raise _refuse("HELLO routes[%d]: %s is not a CIDR, a name or a *.domain pattern"
                          % (index, _short(entry))) from None
    routes = Routes.of(value)
    return None if routes.empty() else routes


def read_client_hello(info):
    """
    Check a client's HELLO.

    @param info: the HELLO's JSON object (a dict).
    @return: a L{ClientHello}.
    @raise HelloRefused: with C{CLOSE_BAD_HELLO} and a reason naming the
        first bad field, checked in this order: C{version}, C{client_id},
        C{group}, C{weight}, C{group_password}, C{routes}.  A bad C{open_ports} entry
        does not refuse the HELLO (see L{read_open_ports}).
    """
    if not isinstance(info, dict):
        raise _refuse("HELLO must be a JSON object")
    if info.get("version") != PROTOCOL_VERSION:
        raise _refuse("protocol version %s not supported" % (_short(info.get("version")),))
    client_id = _text(info, "client_id", None)
    group = _text(info, "group", DEFAULT_GROUP)
    weight = _weight(info)
    group_password = _group_password(info)
    routes = read_routes(info.get("routes"))
    requested = info.get("open_ports")
    return ClientHello(
        client_id=client_id, group=group, weight=weight, group_password=group_password,
        software=str(info.get("software", "")), open_ports=read_open_ports(requested),
        open_ports_not_a_list=requested is not None and not isinstance(requested, list),
        routes=routes)


# -- the fleet list ---------------------------------------------------------------


@attr.s(frozen=True, slots=True)
class FleetNode:
    """
    One gateway of a fleet as the HELLO's C{fleet} list names it.

    @ivar node: its node id (C{gateway.fleet.node_id}).
    @ivar host: the host of its advertised tunnel address.
    @ivar port: the port of that address.
    """

    node = attr.ib()
    host = attr.ib()
    port = attr.ib()

    @property
    def addr(self):
        """C{host:port} (C{[v6]:port}), as the HELLO carries it."""
        return host_port(self.host, self.port)

    @property
    def key(self):
        """C{(host, port)}: the address the client dials."""
        return (self.host, self.port)

    def to_json(self):
        """The entry as the gateway's HELLO carries it."""
        return {"node": self.node, "addr": self.addr}

    @classmethod
    def from_json(cls, entry):
        """
        A L{FleetNode} from one entry of a gateway's C{fleet} list, or
        C{None} if the entry is not a valid one (a node id as
        L{read_client_hello} takes ids, a C{host:port} address).
        """
        if not isinstance(entry, dict):
            return None
        node, addr = entry.get("node"), entry.get("addr")
        if not isinstance(node, str) or not 0 < len(node) <= MAX_ID_LENGTH \
                or not node.isprintable() or not isinstance(addr, str):
            return None
        try:
            host, port = dial_address(addr)
            encoded = host.encode("ascii") if host.isascii() else host.encode("idna")
        except (ValueError, UnicodeError):
            return None
        if len(encoded) > MAX_HOST_LENGTH or not host.isprintable():
            return None
        return cls(node, host, port)


def fleet_list(node_id, tunnel_addr, others):
    """
    The C{fleet} list of a gateway's HELLO: this node first, then the others
    by node id, within L{MAX_FLEET_NODES} entries and L{MAX_FLEET_BYTES}
    bytes (the rest are left out, the same ones on every gateway).

    @param node_id: this gateway's node id.
    @param tunnel_addr: this gateway's advertised tunnel address (C{host:port}).
    @param others: C{(node_id, tunnel_addr)} of the other live, non-draining
        nodes; entries naming this node again are skipped.
    @return: a list of C{{"node": id, "addr": "host:port"}} objects.
    """
    entries = [{"node": node_id, "addr": tunnel_addr}]
    size = len(json.dumps(entries[0]))
    for other_id, addr in sorted(set(others)):
        if other_id == node_id or any(entry["node"] == other_id for entry in entries):
            continue
        entry = {"node": other_id, "addr": addr}
        size += len(json.dumps(entry)) + 2  # and the ", " between entries
        if len(entries) >= MAX_FLEET_NODES or size > MAX_FLEET_BYTES:
            break
        entries.append(entry)
    return entries


def read_fleet(value):
    """
    A HELLO's C{fleet} value as a tuple of L{FleetNode}s (invalid entries
    and repeated node ids left out, at most L{MAX_FLEET_NODES}), or C{None}
    when it is not a list (the gateway is not part of a fleet).
    """
    if not isinstance(value, list):
        return None
    found, seen = [], set()
    for entry in value[:MAX_FLEET_NODES]:
        node = FleetNode.from_json(entry)
        if node is not None and node.node not in seen:
            seen.add(node.node)
            found.append(node)
    return tuple(found)


# -- the gateway's HELLO ----------------------------------------------------------


@attr.s(frozen=True, slots=True)
class GatewayHello:
    """
    A HELLO from the gateway, as the client reads it (L{read_gateway_hello}).

    @ivar software: what the gateway says it runs, or C{None}.
    @ivar open_ports: C{None} when the HELLO has no C{open_ports} list,
        else a tuple of L{PortAnswer}s.  The first HELLO answers every entry
        the client asked for; a later one only the entries whose answer
        changed.
    @ivar node: the gateway's node id in its fleet, or C{None}.
    @ivar fleet: C{None} when the HELLO has no C{fleet} list (no fleet, or
        a later HELLO about something else), else the fleet's nodes as
        L{FleetNode}s (L{read_fleet}), the whole list each time.
    """

    software = attr.ib(default=None)
    open_ports = attr.ib(default=None)
    node = attr.ib(default=None)
    fleet = attr.ib(default=None)


def gateway_hello(open_ports=None, software=SOFTWARE, node=None, fleet=None):
    """
    A HELLO from the gateway.

    @param open_ports: the C{open_ports} answer (a list of L{port_answer}s),
        or C{None} to send no C{open_ports} key (the client asked for none).
    @param software: C{None} to leave it out (a later HELLO).
    @param node: the gateway's node id, sent with C{fleet}.
    @param fleet: the L{fleet_list}, or C{None} to send no C{fleet} key
        (no fleet, or a later HELLO about something else).
    @return: a dict for L{anyproxy.tunnel.frames.Hello}.
    """
    info = {"version": PROTOCOL_VERSION}
    if software is not None:
        info["software"] = software
    if open_ports is not None:
        info["open_ports"] = list(open_ports)
    if fleet is not None:
        info["node"] = node
        info["fleet"] = list(fleet)
    return info


# A refusal's text in an open_ports answer, at most (characters).
MAX_PORT_ERROR = 200


def gateway_hellos(open_ports=None, software=SOFTWARE, node=None, fleet=None, limit=None):
    """
    L{gateway_hello} as one HELLO or more, each within C{limit} bytes of JSON
    (the HELLO frame's bound, less room for the mux's keys, by default): the fleet list and the first
    C{open_ports} answers in the first, the other answers in further HELLOs,
    which the client merges.  A client asking for many ports, each refused
    with a reason, would otherwise get an answer longer than any HELLO.
    """
    from anyproxy.tunnel.frames import MAX_HELLO
    # Room for the keys the mux adds to every HELLO (datagrams, early data...).
    limit = MAX_HELLO - 512 if limit is None else limit
    answers = list(open_ports) if open_ports is not None else None
    for answer in answers or ():
        if len(answer.get("error", "")) > MAX_PORT_ERROR:
            answer["error"] = answer["error"][:MAX_PORT_ERROR - 3] + "..."
    first = gateway_hello([] if answers is not None else None, software, node, fleet)
    hellos, current = [first], first
    for answer in answers or ():
        current["open_ports"].append(answer)
        if len(json.dumps(current, sort_keys=True).encode("utf-8")) > limit \
                and len(current["open_ports"]) > 1:
            current["open_ports"].pop()
            current = gateway_hello([answer], software=None)
            hellos.append(current)
    return hellos


def read_gateway_hello(info):
    """A L{GatewayHello} from the gateway's JSON object; never raises."""
    info = info if isinstance(info, dict) else {}
    software, answers, node = info.get("software"), info.get("open_ports"), info.get("node")
    return GatewayHello(
        software=software if isinstance(software, str) else None,
        open_ports=(tuple(PortAnswer.from_json(entry) for entry in answers)
                    if isinstance(answers, list) else None),
        node=node if isinstance(node, str) and 0 < len(node) <= MAX_ID_LENGTH else None,
        fleet=read_fleet(info.get("fleet")))
