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

Unknown keys are ignored in both directions, so later versions can
announce more.
"""

import attr

from anyproxy import __version__
from anyproxy.addresses import host_port
from anyproxy.auth import DEFAULT_GROUP
from anyproxy.errors import HelloRefused
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
        raise ValueError("%s must be a port number 1..65535, got %r" % (key, value))
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
    try:
        encoded = local_host.encode("ascii") if local_host.isascii() else local_host.encode("idna")
    except UnicodeError:
        raise ValueError("local_host %r is not a valid host name" % (local_host,)) from None
    if not 1 <= len(encoded) <= MAX_HOST_LENGTH:
        # The tunnel's OPEN carries host names of 1..255 bytes.
        raise ValueError("local_host must be 1..%d bytes" % (MAX_HOST_LENGTH,))
    protocol = item.get("protocol", "tcp")
    if protocol not in PORT_PROTOCOLS:
        raise ValueError("protocol must be tcp or udp, got %r" % (protocol,))
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
    """

    client_id = attr.ib()
    group = attr.ib(default=DEFAULT_GROUP)
    weight = attr.ib(default=1.0)
    group_password = attr.ib(default="", repr=False)
    software = attr.ib(default="")
    open_ports = attr.ib(default=None)
    open_ports_not_a_list = attr.ib(default=False)


def client_hello(client_id, group=DEFAULT_GROUP, weight=1.0, group_password="", open_ports=(),
                 software=SOFTWARE):
    """
    The client's HELLO.

    @param weight: the client's share of its group's new streams; sent as an
        integer when it is a whole number.
    @param group_password: sent only when set.
    @param open_ports: what to ask the gateway to forward: objects with
        C{remote_port}, C{local_host}, C{local_port} and C{protocol}
        (L{PortRequest}s or C{client.open_ports} config entries); the key is
        sent only when there are some.
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
    return info


def _text(info, key, default):
    value = info.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise _refuse("HELLO field %r must be a string of 1..%d characters"
                      % (key, MAX_ID_LENGTH))
    # Ids go into logs, metric labels, the status page and close reasons:
    # no control characters, and no lone surrogates (not encodable as UTF-8).
    if not value.isprintable():
        raise _refuse("HELLO field %r must be printable text" % (key,))
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


def read_client_hello(info):
    """
    Check a client's HELLO.

    @param info: the HELLO's JSON object (a dict).
    @return: a L{ClientHello}.
    @raise HelloRefused: with C{CLOSE_BAD_HELLO} and a reason naming the
        first bad field, checked in this order: C{version}, C{client_id},
        C{group}, C{weight}, C{group_password}.  A bad C{open_ports} entry
        does not refuse the HELLO (see L{read_open_ports}).
    """
    if not isinstance(info, dict):
        raise _refuse("HELLO must be a JSON object")
    if info.get("version") != PROTOCOL_VERSION:
        raise _refuse("protocol version %r not supported" % (info.get("version"),))
    client_id = _text(info, "client_id", None)
    group = _text(info, "group", DEFAULT_GROUP)
    weight = _weight(info)
    group_password = _group_password(info)
    requested = info.get("open_ports")
    return ClientHello(
        client_id=client_id, group=group, weight=weight, group_password=group_password,
        software=str(info.get("software", "")), open_ports=read_open_ports(requested),
        open_ports_not_a_list=requested is not None and not isinstance(requested, list))


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
    """

    software = attr.ib(default=None)
    open_ports = attr.ib(default=None)


def gateway_hello(open_ports=None, software=SOFTWARE):
    """
    A HELLO from the gateway.

    @param open_ports: the C{open_ports} answer (a list of L{port_answer}s),
        or C{None} to send no C{open_ports} key (the client asked for none).
    @param software: C{None} to leave it out (a later HELLO).
    @return: a dict for L{anyproxy.tunnel.frames.Hello}.
    """
    info = {"version": PROTOCOL_VERSION}
    if software is not None:
        info["software"] = software
    if open_ports is not None:
        info["open_ports"] = list(open_ports)
    return info


def read_gateway_hello(info):
    """A L{GatewayHello} from the gateway's JSON object; never raises."""
    info = info if isinstance(info, dict) else {}
    software, answers = info.get("software"), info.get("open_ports")
    return GatewayHello(
        software=software if isinstance(software, str) else None,
        open_ports=(tuple(PortAnswer.from_json(entry) for entry in answers)
                    if isinstance(answers, list) else None))
