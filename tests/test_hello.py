# -*- test-case-name: tests.test_hello -*-
"""
Tests for L{anyproxy.tunnel.hello}: building and reading both sides' HELLOs,
the refusal of every malformed client HELLO, the C{open_ports} records, and
hypothesis tests that no JSON object makes a reader fail otherwise.
"""

import collections
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy import __version__
from anyproxy.errors import HelloRefused
from anyproxy.routes import Routes
from anyproxy.tunnel import frames, hello
from anyproxy.tunnel.hello import (
    MAX_GROUP_PASSWORD,
    MAX_ID_LENGTH,
    MAX_WEIGHT,
    MIN_WEIGHT,
    MAX_FLEET_BYTES,
    MAX_FLEET_NODES,
    MAX_ROUTES,
    MAX_ROUTES_BYTES,
    PROTOCOL_VERSION,
    BadPortRequest,
    ClientHello,
    FleetNode,
    GatewayHello,
    PortAnswer,
    PortRequest,
    client_hello,
    fleet_list,
    gateway_hello,
    gateway_hellos,
    parse_port_request,
    port_answer,
    read_client_hello,
    read_gateway_hello,
    read_fleet,
    read_open_ports,
    read_port_request,
    refuse_all,
)


def info(**fields):
    """A valid client HELLO, with C{fields} replaced (C{None} removes a key)."""
    base = {"version": 1, "client_id": "c1", "group": "lab", "software": "anyproxy/test"}
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def wanted(remote_port, local_port=22, protocol="tcp", local_host="localhost"):
    return {"remote_port": remote_port, "local_host": local_host, "local_port": local_port,
            "protocol": protocol}


def refusal(test, hello_info):
    """The reason C{read_client_hello} refuses C{hello_info} with; its code is 4000."""
    with test.assertRaises(HelloRefused) as caught:
        read_client_hello(hello_info)
    test.assertEqual(caught.exception.code, frames.CLOSE_BAD_HELLO)
    return caught.exception.reason


# -- strategies ---------------------------------------------------------------

# Strings as json.loads gives them: any code point, lone surrogates included.
json_text = st.text(st.characters(blacklist_categories=()), max_size=20)
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | json_text)
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(json_text, children, max_size=4)),
    max_leaves=12)
port_numbers = st.integers(min_value=1, max_value=65535)
names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cn", "Co", "Zs", "Cf")),
                min_size=1, max_size=MAX_ID_LENGTH)
weights = st.floats(min_value=MIN_WEIGHT, max_value=MAX_WEIGHT) | st.integers(1, MAX_WEIGHT)


def mostly(valid):
    """C{valid} three times in four, else any JSON value."""
    return st.integers(0, 3).flatmap(lambda pick: valid if pick else json_values)


# Entries and HELLOs near valid ones, so that both outcomes happen often.
port_entries = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "remote_port": mostly(port_numbers), "local_port": mostly(port_numbers),
        "local_host": mostly(st.sampled_from(["db", "10.0.0.1", "b\u00fccher.example", ""])),
    }, optional={"protocol": mostly(st.sampled_from(["tcp", "udp", "sctp"]))}))
near_valid_infos = st.fixed_dictionaries({
    "version": mostly(st.just(1)),
    "client_id": mostly(names),
}, optional={
    "group": mostly(names),
    "weight": mostly(weights),
    "group_password": mostly(st.text(max_size=MAX_GROUP_PASSWORD)),
    "software": mostly(json_text),
    "open_ports": mostly(st.lists(port_entries, max_size=4)),
    "other": json_values})
# Client HELLOs: any JSON object, and objects whose keys are mostly valid.
any_infos = st.dictionaries(json_text, json_values, max_size=6) | near_valid_infos


def check_port_request(test, entry):
    """C{entry} is a valid L{PortRequest} or a L{BadPortRequest}."""
    if isinstance(entry, PortRequest):
        test.assertTrue(1 <= entry.remote_port <= 65535 and 1 <= entry.local_port <= 65535)
        test.assertIn(entry.protocol, hello.PORT_PROTOCOLS)
        test.assertIsInstance(entry.local_host, str)
    else:
        test.assertIsInstance(entry, BadPortRequest)
        test.assertIsInstance(entry.problem, str)
        test.assertTrue(entry.remote_port is None or isinstance(entry.remote_port, int))
        test.assertTrue(entry.protocol is None or isinstance(entry.protocol, str))


# -- the client's HELLO -------------------------------------------------------


class ClientHelloTests(SynchronousTestCase):
    """L{client_hello} builds what the protocol documents."""

    def test_defaults(self):
        """Version, ids, software and weight 1; no group_password or open_ports keys."""
        self.assertEqual(client_hello("c1", "lab"), {
            "version": 1, "client_id": "c1", "group": "lab",
            "software": "anyproxy/" + __version__, "weight": 1})

    def test_weight(self):
        """A whole weight is sent as an integer, a fractional one as it is."""
        self.assertEqual(client_hello("c1", weight=3.0)["weight"], 3)
        self.assertIsInstance(client_hello("c1", weight=3.0)["weight"], int)
        self.assertEqual(client_hello("c1", weight=0.25)["weight"], 0.25)

    def test_group_password_only_when_set(self):
        """The group password is sent when set, and not as an empty key."""
        self.assertEqual(client_hello("c1", group_password="pw")["group_password"], "pw")
        self.assertNotIn("group_password", client_hello("c1", group_password=""))

    def test_open_ports(self):
        """Each asked port is an entry with its four fields; none asked, no key."""
        self.assertNotIn("open_ports", client_hello("c1", open_ports=()))
        asked = [PortRequest(9001, "db", 5432), PortRequest(9053, "dns", 53, "udp")]
        self.assertEqual(client_hello("c1", open_ports=asked)["open_ports"],
                         [wanted(9001, 5432, local_host="db"),
                          wanted(9053, 53, "udp", local_host="dns")])

    def test_open_ports_from_config(self):
        """Config entries (anything with the four attributes) are taken too."""
        entry = collections.namedtuple("Entry", "remote_port local_host local_port protocol")
        sent = client_hello("c1", open_ports=[entry(9001, "db", 5432, "tcp")])
        self.assertEqual(sent["open_ports"], [wanted(9001, 5432, local_host="db")])

    def test_json(self):
        """The HELLO is a JSON object a HELLO frame carries."""
        sent = client_hello("c1", weight=2.5, group_password="pw",
                            open_ports=[PortRequest(9001, "db", 5432)])
        frame = frames.decode(frames.encode(frames.Hello(sent)))
        self.assertEqual(frame.info, json.loads(json.dumps(sent)))


class ReadClientHelloTests(SynchronousTestCase):
    """L{read_client_hello} takes good HELLOs and refuses bad ones with 4000 and a reason."""

    def test_good(self):
        """Every field is read."""
        read = read_client_hello(info(weight=2.5, group_password="pw",
                                      open_ports=[wanted(9001)]))
        self.assertEqual(read, ClientHello(
            client_id="c1", group="lab", weight=2.5, group_password="pw",
            software="anyproxy/test", open_ports=(PortRequest(9001, "localhost", 22),)))

    def test_defaults(self):
        """Group default, weight 1.0, no password, no software, no ports asked."""
        read = read_client_hello({"version": 1, "client_id": "c1"})
        self.assertEqual(read, ClientHello(client_id="c1", group="default", weight=1.0,
                                           group_password="", software="", open_ports=None))
        self.assertIsInstance(read.weight, float)

    def test_unknown_keys_ignored(self):
        """Keys a later version may add are ignored."""
        self.assertEqual(read_client_hello(info(future={"x": 1})), read_client_hello(info()))

    def test_software_as_text(self):
        """A software value that is not a string is kept as its text."""
        self.assertEqual(read_client_hello(info(software=7)).software, "7")

    def test_version(self):
        """Another version, or none, is refused naming it."""
        self.assertEqual(refusal(self, info(version=2)), "protocol version 2 not supported")
        self.assertEqual(refusal(self, info(version=None)),
                         "protocol version None not supported")
        self.assertEqual(refusal(self, info(version="1")),
                         "protocol version '1' not supported")
        self.assertLess(len(refusal(self, info(version="v" * 250000))), 100)

    def test_names(self):
        """client_id (required) and group must be strings of 1..128 characters."""
        for field in ("client_id", "group"):
            for bad in ("", "x" * (MAX_ID_LENGTH + 1), 5, ["a"]):
                self.assertEqual(refusal(self, info(**{field: bad})),
                                 "HELLO field %r must be a string of 1..128 characters"
                                 % (field,))
        self.assertIn("'client_id'", refusal(self, info(client_id=None)))
        self.assertEqual(read_client_hello(info(client_id="x" * MAX_ID_LENGTH)).client_id,
                         "x" * MAX_ID_LENGTH)
        # A dot segment would turn the status page's URL for this client
        # (api/clients/ID/drain) into one for the gateway (api/drain).
        for field in ("client_id", "group"):
            for dots in (".", ".."):
                self.assertEqual(refusal(self, info(**{field: dots})),
                                 "HELLO field %r must not be %r" % (field, dots))
        self.assertEqual(read_client_hello(info(client_id="a..b")).client_id, "a..b")

    def test_weight(self):
        """A weight outside 0.01..10000, or not a number, is refused; the bounds are taken."""
        for bad in (0, -1, 1e-300, 0.009, 10001, float("nan"), float("inf"), "3", True,
                    [1]):
            self.assertEqual(refusal(self, info(weight=bad)),
                             "HELLO field 'weight' must be a number from 0.01 to 10000")
        self.assertEqual(refusal(self, dict(info(), weight=None)),
                         "HELLO field 'weight' must be a number from 0.01 to 10000")
        for good in (MIN_WEIGHT, MAX_WEIGHT, 1, 0.25):
            self.assertEqual(read_client_hello(info(weight=good)).weight, float(good))

    def test_group_password(self):
        """A group password not a string or too long is refused, without quoting it."""
        for bad in (12345678, "x" * MAX_GROUP_PASSWORD + "secret-pw"):
            reason = refusal(self, info(group_password=bad))
            self.assertEqual(reason, "HELLO field 'group_password' must be a string of at "
                                     "most 1024 characters")
        long_enough = "x" * MAX_GROUP_PASSWORD
        self.assertEqual(read_client_hello(info(group_password=long_enough)).group_password,
                         long_enough)

    def test_password_not_in_repr(self):
        """A read HELLO's repr does not show the group password."""
        self.assertNotIn("secret-pw", repr(read_client_hello(info(group_password="secret-pw"))))

    def test_order(self):
        """The first bad field is named: version, client_id, group, weight, group_password."""
        everything_bad = {"version": 9, "client_id": 1, "group": 1, "weight": 0,
                          "group_password": 1}
        expected = ["version", "'client_id'", "'group'", "'weight'", "'group_password'"]
        for key, named in zip(list(everything_bad), expected):
            self.assertIn(named, refusal(self, everything_bad))
            everything_bad[key] = info(weight=1, group_password="")[key]

    def test_not_an_object(self):
        """A HELLO that is not an object is refused."""
        self.assertEqual(refusal(self, [1]), "HELLO must be a JSON object")

    def test_bad_open_ports_never_refuse(self):
        """Bad open_ports entries are read as BadPortRequests; the HELLO stands."""
        read = read_client_hello(info(open_ports=[{"remote_port": 9001}, wanted(9002)]))
        bad, good = read.open_ports
        self.assertEqual((bad.remote_port, bad.protocol), (9001, "tcp"))
        self.assertIn("local_port", bad.problem)
        self.assertEqual(good, PortRequest(9002, "localhost", 22))
        self.assertFalse(read.open_ports_not_a_list)

    def test_unprintable_or_surrogate_refused(self):
        """Ids with control characters or lone surrogates, and such passwords, are refused."""
        for key, value in [("client_id", "a\nb"), ("group", "\ud800"), ("client_id", "x\x1b[31m")]:
            self.assertEqual(refusal(self, info(**{key: value})),
                             "HELLO field %r must be printable text" % (key,))
        self.assertIn("group_password", refusal(self, info(group_password="\udfff")))

    def test_open_ports_not_a_list(self):
        """An open_ports value that is not a list asks for nothing, and says so."""
        read = read_client_hello(info(open_ports="9001"))
        self.assertEqual((read.open_ports, read.open_ports_not_a_list), ((), True))

    def test_built_hello_read(self):
        """What L{client_hello} builds, L{read_client_hello} reads back."""
        sent = client_hello("c1", "lab", 3.0, "pw", [PortRequest(9001, "db", 5432, "udp")])
        self.assertEqual(read_client_hello(sent), ClientHello(
            "c1", "lab", 3.0, "pw", "anyproxy/" + __version__,
            (PortRequest(9001, "db", 5432, "udp"),)))


class ClientHelloPropertyTests(SynchronousTestCase):
    """No JSON object makes L{read_client_hello} fail other than with L{HelloRefused}."""

    @settings(deadline=None, max_examples=300)
    @given(any_infos)
    def test_read_or_refused(self, hello_info):
        """Any JSON object is read into a valid record or refused with 4000."""
        try:
            read = read_client_hello(hello_info)
        except HelloRefused as refused:
            self.assertEqual(refused.code, frames.CLOSE_BAD_HELLO)
            self.assertIsInstance(refused.reason, str)
            refused.reason.encode("utf-8")  # the close frame carries it
            return
        self.assertIsInstance(read, ClientHello)
        for name in (read.client_id, read.group):
            self.assertIsInstance(name, str)
            self.assertTrue(1 <= len(name) <= MAX_ID_LENGTH)
            self.assertTrue(name.isprintable())
            name.encode("utf-8")  # logs, labels and close reasons carry it
        self.assertIsInstance(read.weight, float)
        self.assertTrue(MIN_WEIGHT <= read.weight <= MAX_WEIGHT)
        self.assertIsInstance(read.group_password, str)
        self.assertLessEqual(len(read.group_password), MAX_GROUP_PASSWORD)
        read.group_password.encode("utf-8")  # digested as UTF-8
        self.assertIsInstance(read.software, str)
        if read.open_ports is not None:
            self.assertIsInstance(read.open_ports, tuple)
            for entry in read.open_ports:
                check_port_request(self, entry)

    @settings(deadline=None)
    @given(names, names, weights, st.text(max_size=MAX_GROUP_PASSWORD),
           st.lists(st.builds(PortRequest, port_numbers, st.sampled_from(["db", "10.0.0.1"]),
                              port_numbers, st.sampled_from(hello.PORT_PROTOCOLS)),
                    max_size=3))
    def test_round_trip(self, client_id, group, weight, group_password, open_ports):
        """Whatever the client may send, through a HELLO frame, reads back as sent."""
        sent = client_hello(client_id, group, weight, group_password, open_ports)
        read = read_client_hello(frames.decode(frames.encode(frames.Hello(sent))).info)
        self.assertEqual((read.client_id, read.group, read.weight, read.group_password),
                         (client_id, group, float(weight), group_password))
        self.assertEqual(read.open_ports, tuple(open_ports) or None)


# -- open_ports -----------------------------------------------------------------


class GatewayHellosTests(SynchronousTestCase):
    """The gateway's answer in as many HELLOs as it needs, each one the client can read."""

    def test_many_refusals_split(self):
        """
        150 ports asked (a HELLO of 12 KB), each refused with a long reason:
        the answers come in several HELLOs within the frame's bound, the
        first with the fleet list; together they answer every port once.
        """
        ports = [PortRequest(10000 + i, "a", 1, "tcp") for i in range(150)]
        asked = client_hello("c", open_ports=ports)
        self.assertLess(len(frames.encode(frames.Hello(asked))), frames.MAX_HELLO)
        answers = [port_answer(entry, False, "not in gateway.open_ports_allowed " + "x" * 400)
                   for entry in asked["open_ports"]]
        fleet = [{"node": "n%d" % i, "addr": "gw%d.example.com:8443" % i} for i in range(20)]
        hellos = gateway_hellos(answers, node="n0", fleet=fleet)
        self.assertGreater(len(hellos), 1)
        read = []
        for index, info in enumerate(hellos):
            # Within the bound with the keys the mux adds (Mux.send_hello).
            with_mux_keys = dict(info, **{frames.HELLO_DATAGRAMS: True, frames.HELLO_DIALED: True,
                                          frames.HELLO_EARLY_DATA: 65536})
            frame = frames.decode(frames.encode(frames.Hello(with_mux_keys)))
            hello = read_gateway_hello(frame.info)
            self.assertEqual(hello.fleet is not None, index == 0)
            self.assertEqual(hello.software is not None, index == 0)
            read.extend(hello.open_ports)
        self.assertEqual(sorted(answer.remote_port for answer in read),
                         [10000 + i for i in range(150)])
        self.assertTrue(all(len(answer.error) <= 200 for answer in read))

    def test_small_answer_one_hello(self):
        """An answer that fits is the one HELLO gateway_hello builds."""
        answers = [port_answer(PortRequest(9000, "a", 1, "tcp"), True)]
        self.assertEqual(gateway_hellos(answers), [gateway_hello(answers)])
        self.assertEqual(gateway_hellos(None), [gateway_hello(None)])


class PortRequestTests(SynchronousTestCase):
    """C{open_ports} entries are checked field by field."""

    def test_good_entry(self):
        """A complete entry parses; protocol defaults to tcp."""
        request = parse_port_request({"remote_port": 9001, "local_host": "db", "local_port": 5432})
        self.assertEqual((request.key, request.local_host, request.local_port, request.label),
                         ((9001, "tcp"), "db", 5432, "9001/tcp"))

    def test_target(self):
        """The target is host:port, with an IPv6 literal bracketed."""
        self.assertEqual(PortRequest(9001, "db", 5432).target, "db:5432")
        self.assertEqual(PortRequest(9001, "::1", 5432).target, "[::1]:5432")

    def test_bad_entries(self):
        """Bad ports, hosts and protocols are refused naming the field."""
        cases = [
            ("not a dict", "object"),
            ({"remote_port": 0, "local_host": "a", "local_port": 1}, "remote_port"),
            ({"remote_port": True, "local_host": "a", "local_port": 1}, "remote_port"),
            ({"remote_port": 9001, "local_host": "a", "local_port": 70000}, "local_port"),
            ({"remote_port": 9001, "local_host": "", "local_port": 1}, "local_host"),
            ({"remote_port": 9001, "local_host": 5, "local_port": 1}, "local_host"),
            ({"remote_port": 9001, "local_host": "a" * 256, "local_port": 1}, "local_host"),
            ({"remote_port": 9001, "local_host": "\ud800", "local_port": 1}, "local_host"),
            ({"remote_port": 9001, "local_host": "a", "local_port": 1, "protocol": "sctp"},
             "protocol"),
            # Logged with every forwarded connection: no control characters or spaces.
            ({"remote_port": 9001, "local_host": "x\r\n2099 [fake#critical]", "local_port": 1},
             "local_host"),
            ({"remote_port": 9001, "local_host": "db\x1b[2J", "local_port": 1}, "local_host"),
            ({"remote_port": 9001, "local_host": "d b", "local_port": 1}, "local_host"),
            # A huge value is not repeated whole in the refusal.
            ({"remote_port": "9" * 100000, "local_host": "a", "local_port": 1}, "remote_port"),
            ({"remote_port": 9001, "local_host": "a", "local_port": 1, "protocol": "x" * 100000},
             "protocol"),
        ]
        for item, field in cases:
            with self.assertRaises(ValueError) as caught:
                parse_port_request(item)
            self.assertIn(field, str(caught.exception))
            self.assertLess(len(str(caught.exception)), 200)

    def test_json_round_trip(self):
        """An entry's JSON parses back to it."""
        request = PortRequest(9053, "dns.internal", 53, "udp")
        self.assertEqual(parse_port_request(request.to_json()), request)

    def test_read_bad_entry(self):
        """A bad entry reads as a BadPortRequest naming what usable port and protocol it has."""
        self.assertEqual(read_port_request({"remote_port": 9001, "protocol": "udp"}),
                         BadPortRequest(9001, "udp", "local_port must be a port number "
                                                     "1..65535, got None"))
        bad = read_port_request({"remote_port": "9001", "protocol": 6})
        self.assertEqual((bad.remote_port, bad.protocol), (None, None))
        self.assertEqual(read_port_request([]).problem, "entry must be an object, got 'list'")

    def test_read_open_ports(self):
        """None is nothing asked; a non-list asks for nothing; entries read in order."""
        self.assertIsNone(read_open_ports(None))
        self.assertEqual(read_open_ports("9001"), ())
        self.assertEqual(read_open_ports({"remote_port": 9001}), ())
        read = read_open_ports([wanted(9001), 5])
        self.assertEqual(read[0], PortRequest(9001, "localhost", 22))
        self.assertIsInstance(read[1], BadPortRequest)

    def test_read_twice(self):
        """Entries already read are read as they are."""
        once = read_open_ports([wanted(9001), 5])
        self.assertEqual(read_open_ports(once), once)

    @settings(deadline=None)
    @given(port_entries)
    def test_read_never_raises(self, item):
        """Any JSON entry reads as a valid PortRequest or a BadPortRequest."""
        check_port_request(self, read_port_request(item))


class PortAnswerTests(SynchronousTestCase):
    """The gateway's answers to C{open_ports} entries."""

    def test_answer(self):
        """An answer names the entry's port and protocol, whether it is open, and why not."""
        self.assertEqual(port_answer(PortRequest(9001, "db", 5432), True),
                         {"remote_port": 9001, "protocol": "tcp", "ok": True, "error": ""})
        self.assertEqual(port_answer(BadPortRequest(None, "udp", "bad"), False, "why"),
                         {"remote_port": None, "protocol": "udp", "ok": False, "error": "why"})
        self.assertEqual(port_answer({"remote_port": 9001, "protocol": 5}, False, "why"),
                         {"remote_port": 9001, "protocol": None, "ok": False, "error": "why"})

    def test_refuse_all(self):
        """Without forwarding every entry is refused; nothing asked, nothing answered."""
        self.assertIsNone(refuse_all(None, "off"))
        self.assertEqual(refuse_all([wanted(9001)], "off"),
                         [{"remote_port": 9001, "protocol": "tcp", "ok": False, "error": "off"}])
        self.assertEqual(refuse_all("9001", "off"), [])
        self.assertEqual(refuse_all(read_open_ports([wanted(9001, protocol="udp")]), "off"),
                         [{"remote_port": 9001, "protocol": "udp", "ok": False, "error": "off"}])

    def test_read_answer(self):
        """An answer reads back; what is of the wrong type reads as absent."""
        answer = PortAnswer(9001, "tcp", True, "")
        self.assertEqual(PortAnswer.from_json(answer.to_json()), answer)
        self.assertEqual(PortAnswer.from_json({"remote_port": True, "ok": 1, "error": 5}),
                         PortAnswer(None, None, False, ""))
        self.assertEqual(PortAnswer.from_json("x"), PortAnswer(None, None, False, ""))
        self.assertEqual(answer.key, (9001, "tcp"))


# -- the gateway's HELLO ----------------------------------------------------------


class GatewayHelloTests(SynchronousTestCase):
    """L{gateway_hello} builds the gateway's HELLOs and L{read_gateway_hello} reads them."""

    def test_answer(self):
        """The first HELLO has version and software, and open_ports only when asked."""
        self.assertEqual(gateway_hello(), {"version": PROTOCOL_VERSION,
                                           "software": "anyproxy/" + __version__})
        answers = refuse_all([wanted(9001)], "off")
        self.assertEqual(gateway_hello(answers)["open_ports"], answers)
        self.assertEqual(gateway_hello([])["open_ports"], [])

    def test_later_hello(self):
        """A later HELLO may leave out the software."""
        answer = port_answer(PortRequest(9001, "db", 5432), True)
        self.assertEqual(gateway_hello([answer], software=None),
                         {"version": 1, "open_ports": [answer]})

    def test_read(self):
        """The client reads the software and the answers."""
        answer = port_answer(PortRequest(9001, "db", 5432), True)
        self.assertEqual(read_gateway_hello(gateway_hello([answer], software="gw/1")),
                         GatewayHello("gw/1", (PortAnswer(9001, "tcp", True, ""),)))
        self.assertEqual(read_gateway_hello(gateway_hello()),
                         GatewayHello("anyproxy/" + __version__, None))

    def test_read_lenient(self):
        """Values of the wrong type read as absent: the gateway has accepted the tunnel."""
        self.assertEqual(read_gateway_hello({"software": 5, "open_ports": "x"}), GatewayHello())
        self.assertEqual(read_gateway_hello([]), GatewayHello())

    @settings(deadline=None)
    @given(st.dictionaries(json_text, json_values, max_size=6)
           | st.fixed_dictionaries({"open_ports": st.lists(json_values, max_size=4)}))
    def test_read_never_raises(self, gateway_info):
        """Any JSON object reads as a GatewayHello."""
        read = read_gateway_hello(gateway_info)
        self.assertTrue(read.software is None or isinstance(read.software, str))
        for answer in read.open_ports or ():
            self.assertIsInstance(answer, PortAnswer)
            self.assertIsInstance(answer.ok, bool)
            self.assertEqual(PortAnswer.from_json(answer.to_json()), answer)


# -- the fleet list -------------------------------------------------------------------


class FleetListTests(SynchronousTestCase):
    """The gateway's C{node} and C{fleet} keys: built by L{fleet_list}, read by L{read_fleet}."""

    def test_this_node_first(self):
        """This node first, then the others by node id, without repeating this node."""
        self.assertEqual(fleet_list("gw-b", "b.example:8443", [
            ("gw-c", "c.example:8443"), ("gw-a", "[2001:db8::1]:8443"),
            ("gw-b", "stale.example:1")]), [
            {"node": "gw-b", "addr": "b.example:8443"},
            {"node": "gw-a", "addr": "[2001:db8::1]:8443"},
            {"node": "gw-c", "addr": "c.example:8443"}])

    def test_bounded(self):
        """At most MAX_FLEET_NODES entries and MAX_FLEET_BYTES of JSON; this node always."""
        many = [("gw-%03d" % (n,), "gw-%03d.example:8443" % (n,)) for n in range(200)]
        listed = fleet_list("self", "self.example:8443", many)
        self.assertEqual(len(listed), MAX_FLEET_NODES)
        self.assertEqual(listed[0]["node"], "self")
        self.assertEqual(listed[1:], [{"node": node, "addr": addr}
                                      for node, addr in many[:MAX_FLEET_NODES - 1]])
        long_ids = [("n" * 120 + "%03d" % (n,), "h" * 200 + ":1") for n in range(60)]
        self.assertLessEqual(len(json.dumps(fleet_list("self", "s:1", long_ids))),
                             MAX_FLEET_BYTES + 2)

    def test_hello(self):
        """The HELLO carries node and fleet only with a fleet; the client reads both."""
        entries = fleet_list("gw-a", "10.0.0.1:8443", [("gw-b", "gw-b.example:443")])
        sent = gateway_hello(node="gw-a", fleet=entries)
        self.assertEqual(sent["node"], "gw-a")
        self.assertNotIn("fleet", gateway_hello())
        self.assertNotIn("node", gateway_hello())
        frame = frames.decode(frames.encode(frames.Hello(sent)))
        read = read_gateway_hello(frame.info)
        self.assertEqual(read.node, "gw-a")
        self.assertEqual(read.fleet, (FleetNode("gw-a", "10.0.0.1", 8443),
                                      FleetNode("gw-b", "gw-b.example", 443)))
        self.assertEqual(read.fleet[1].key, ("gw-b.example", 443))
        self.assertIsNone(read_gateway_hello(gateway_hello()).fleet)

    def test_later_hello_without_fleet(self):
        """A later HELLO about ports has no fleet list (None: nothing to change)."""
        answer = port_answer(PortRequest(9001, "db", 5432), True)
        read = read_gateway_hello(gateway_hello([answer], software=None))
        self.assertEqual((read.node, read.fleet), (None, None))

    def test_bad_entries_dropped(self):
        """Entries without a usable node id or host:port, and repeated ids, are left out."""
        self.assertEqual(read_fleet([
            {"node": "ok", "addr": "h:1"}, {"node": "", "addr": "h:1"},
            {"node": "x" * (MAX_ID_LENGTH + 1), "addr": "h:1"}, {"node": "a\n", "addr": "h:1"},
            {"node": "b", "addr": "h"}, {"node": "c", "addr": "h:0"}, {"node": "d", "addr": 5},
            {"node": "e", "addr": "a b:1"}, {"node": 7, "addr": "h:1"}, "x", None,
            {"node": "ok", "addr": "other:2"}, {"node": "f", "addr": "[::1]:9"}]),
            (FleetNode("ok", "h", 1), FleetNode("f", "::1", 9)))
        self.assertIsNone(read_fleet({"node": "ok"}))
        self.assertEqual(read_fleet([]), ())

    def test_read_at_most(self):
        """A list longer than MAX_FLEET_NODES is read up to it."""
        entries = [{"node": "n%d" % (n,), "addr": "h:%d" % (n + 1,)} for n in range(100)]
        self.assertEqual(len(read_fleet(entries)), MAX_FLEET_NODES)

    @settings(deadline=None)
    @given(st.lists(json_values | st.fixed_dictionaries(
        {"node": mostly(names), "addr": mostly(st.sampled_from(
            ["gw.example:8443", "[::1]:1", "10.0.0.1:65535", "x:0", ":1", "b\u00fccher.de:1"]))}),
        max_size=6), mostly(names))
    def test_read_never_raises(self, fleet, node):
        """Any fleet value reads as FleetNodes that round-trip."""
        read = read_gateway_hello({"version": 1, "node": node, "fleet": fleet})
        self.assertTrue(read.node is None or isinstance(read.node, str))
        for entry in read.fleet:
            self.assertEqual(FleetNode.from_json(entry.to_json()), entry)


# -- routes ---------------------------------------------------------------------


class RoutesHelloTests(SynchronousTestCase):
    """C{routes}: what a client can reach, announced in its HELLO (docs/ROUTES.md)."""

    def test_sent_only_when_set(self):
        """The key is sent only when the client has routes."""
        self.assertNotIn("routes", client_hello("c1"))
        self.assertEqual(client_hello("c1", routes=("*.corp.example", "10.1.0.0/16"))["routes"],
                         ["*.corp.example", "10.1.0.0/16"])

    def test_round_trip(self):
        """Routes sent through a HELLO frame read back as the same routes."""
        texts = ("*.corp.example", "db.lan", "10.1.0.0/16", "fd00::/8")
        sent = client_hello("c1", routes=texts)
        read = read_client_hello(frames.decode(frames.encode(frames.Hello(sent))).info)
        self.assertEqual(read.routes, Routes.of(texts))

    def test_absent_or_empty_serves_anything(self):
        """An old client (no key) and an empty list both read as None: it serves anything."""
        self.assertIsNone(read_client_hello(info()).routes)
        self.assertIsNone(read_client_hello(info(routes=[])).routes)

    def test_bad_routes_refused(self):
        """A bad entry, a non-list or too much refuses the HELLO, naming what is wrong."""
        self.assertEqual(refusal(self, info(routes=["10.0.0.0/8", "not a route"])),
                         "HELLO routes[1]: 'not a route' is not a CIDR, a name or a "
                         "*.domain pattern")
        self.assertIn("routes[0]", refusal(self, info(routes=[7])))
        self.assertIn("routes[0]", refusal(self, info(routes=["db\x00.lan"])))
        self.assertIn("routes[0]: 'xxxxxxxxx", refusal(self, info(routes=["x" * 500])))
        self.assertLessEqual(len(refusal(self, info(routes=["x" * 500])).encode()), 120)
        self.assertEqual(refusal(self, info(routes="10.0.0.0/8")),
                         "HELLO field 'routes' must be a list of strings")
        too_many = ["10.%d.%d.0/24" % (i // 256, i % 256) for i in range(MAX_ROUTES + 1)]
        self.assertIn("at most %d entries" % (MAX_ROUTES,), refusal(self, info(routes=too_many)))
        self.assertIn("%d bytes" % (MAX_ROUTES_BYTES,),
                      refusal(self, info(routes=["a%d.%s.example" % (i, "x" * 50)
                                                 for i in range(200)])))

    @settings(deadline=None, max_examples=200)
    @given(st.lists(json_values, max_size=5))
    def test_read_or_refused(self, value):
        """Any JSON list is read into routes (or None) or refused with 4000."""
        try:
            read = read_client_hello(info(routes=value))
        except HelloRefused as refused:
            self.assertEqual(refused.code, frames.CLOSE_BAD_HELLO)
            refused.reason.encode("utf-8")
            return
        self.assertTrue(read.routes is None or isinstance(read.routes, Routes))
