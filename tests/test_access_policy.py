# -*- test-case-name: tests.test_access_policy -*-
"""
Tests for L{anyproxy.access_policy}.
"""

import ipaddress

from hypothesis import assume, given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.access_policy import AccessPolicy, HostRule, LimitRule, normalise_address
from anyproxy.errors import Reason


def policy(forbidden=(), allowed=(), allow_udp=True):
    """An L{AccessPolicy} from rule texts and C{(addr, protocol)} pairs."""
    return AccessPolicy(
        forbidden=tuple(HostRule.parse(text) for text in forbidden),
        allowed=tuple(LimitRule.parse(addr, protocol) for addr, protocol in allowed),
        allow_udp=allow_udp,
    )


def address(text):
    return ipaddress.ip_address(text)


class HostRuleParseTests(SynchronousTestCase):
    """L{HostRule.parse} accepts every documented form and refuses the rest."""

    def test_hostname(self):
        """A host name is stored lower case, without a trailing dot."""
        rule = HostRule.parse("Internal.Example.COM.")
        self.assertEqual((rule.kind, rule.value, rule.port), ("name", "internal.example.com", None))

    def test_hostname_with_port(self):
        """A host name may carry a port."""
        rule = HostRule.parse("localhost:8080")
        self.assertEqual((rule.kind, rule.value, rule.port), ("name", "localhost", 8080))

    def test_wildcard(self):
        """C{*.domain} is a wildcard rule on the domain."""
        rule = HostRule.parse("*.Example.com:443")
        self.assertEqual((rule.kind, rule.value, rule.port), ("wildcard", "example.com", 443))

    def test_ipv4_address(self):
        """An IPv4 address is a /32 network."""
        rule = HostRule.parse("10.1.2.3")
        self.assertEqual(rule.value, ipaddress.ip_network("10.1.2.3/32"))

    def test_ipv6_address(self):
        """A bare IPv6 address is a /128 network without port."""
        rule = HostRule.parse("::1")
        self.assertEqual((rule.value, rule.port), (ipaddress.ip_network("::1/128"), None))

    def test_ipv6_with_port(self):
        """An IPv6 address with a port is written in brackets."""
        rule = HostRule.parse("[::1]:22")
        self.assertEqual((rule.value, rule.port), (ipaddress.ip_network("::1/128"), 22))

    def test_cidr(self):
        """CIDR networks parse for both families, host bits allowed."""
        self.assertEqual(HostRule.parse("169.254.0.0/16").value, ipaddress.ip_network("169.254.0.0/16"))
        self.assertEqual(HostRule.parse("fd00::/8").value, ipaddress.ip_network("fd00::/8"))
        self.assertEqual(HostRule.parse("10.0.0.5/8").value, ipaddress.ip_network("10.0.0.0/8"))

    def test_cidr_with_port(self):
        """A CIDR may carry a port; an IPv6 one in brackets."""
        self.assertEqual(HostRule.parse("10.0.0.0/8:22").port, 22)
        self.assertEqual(HostRule.parse("[fd00::/8]:22").port, 22)

    def test_legacy_prefix(self):
        """C{192.168.1.} is 192.168.1.0/24 and C{10.} is 10.0.0.0/8."""
        self.assertEqual(HostRule.parse("192.168.1.").value, ipaddress.ip_network("192.168.1.0/24"))
        self.assertEqual(HostRule.parse("10.").value, ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(HostRule.parse("172.16.:443").port, 443)

    def test_mapped_network_becomes_ipv4(self):
        """An IPv4-mapped IPv6 network is stored as the IPv4 network."""
        self.assertEqual(HostRule.parse("::ffff:10.0.0.0/104").value, ipaddress.ip_network("10.0.0.0/8"))

    def test_bad_rules(self):
        """Malformed rules raise ValueError naming the rule."""
        for text in ["", "  ", "host:", "host:0", "host:70000", "host:x", "[::1", "[::1]x",
                     "10.0.0.0/33", "300.1.", "1.2.3", "*", "*.", "a..b", "-bad-.com",
                     "fd00::/200", ":22", "exa mple.com"]:
            self.assertRaises(ValueError, HostRule.parse, text)

    def test_prefix_hint(self):
        """A dotted number without its trailing dot suggests the prefix form."""
        error = self.assertRaises(ValueError, HostRule.parse, "192.168.1")
        self.assertIn("'192.168.1.'", str(error))

    def test_not_a_string(self):
        """A non-string rule raises ValueError, not TypeError."""
        self.assertRaises(ValueError, HostRule.parse, 42)

    @given(st.text(max_size=60))
    def test_parse_only_raises_value_error(self, text):
        """Random text either parses or raises ValueError."""
        try:
            HostRule.parse(text)
        except ValueError:
            pass

    @given(st.text(alphabet="0123456789abcdef.:/[]*-", max_size=40))
    def test_parse_address_alphabet(self, text):
        """Text made of address characters either parses or raises ValueError."""
        try:
            HostRule.parse(text)
        except ValueError:
            pass


class HostRuleMatchTests(SynchronousTestCase):
    """Matching names and addresses against one rule."""

    def test_exact_name(self):
        """A name rule matches only that name, any port."""
        rule = HostRule.parse("internal.example.com")
        self.assertTrue(rule.matches_name("internal.example.com", 80))
        self.assertFalse(rule.matches_name("x.internal.example.com", 80))
        self.assertFalse(rule.matches_address(address("10.0.0.1"), 80))

    def test_wildcard_subdomains_not_apex(self):
        """C{*.example.com} matches subdomains at any depth but not the apex."""
        rule = HostRule.parse("*.example.com")
        self.assertTrue(rule.matches_name("a.example.com", 1))
        self.assertTrue(rule.matches_name("a.b.example.com", 1))
        self.assertFalse(rule.matches_name("example.com", 1))
        self.assertFalse(rule.matches_name("badexample.com", 1))

    def test_port(self):
        """A rule with a port matches only that port."""
        rule = HostRule.parse("10.0.0.0/8:22")
        self.assertTrue(rule.matches_address(address("10.1.1.1"), 22))
        self.assertFalse(rule.matches_address(address("10.1.1.1"), 23))

    def test_ipv6_supernet_skips_mapped(self):
        """An IPv6 rule wider than the mapped range does not cover IPv4."""
        rule = HostRule.parse("::/0")
        self.assertFalse(rule.matches_address(normalise_address("::ffff:10.0.0.1"), 1))
        self.assertTrue(rule.matches_address(normalise_address("2001:db8::1"), 1))

    def test_normalise_text(self):
        """Literals in any spelling normalise, every time; names are refused every time."""
        for _ in range(2):  # the second time from the cache
            self.assertEqual(normalise_address(" [::ffff:10.0.0.1] "), ipaddress.IPv4Address("10.0.0.1"))
            self.assertEqual(normalise_address("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1"))
            self.assertRaises(ValueError, normalise_address, "example.com")

    def test_family_mismatch(self):
        """An IPv6 address never matches an IPv4 network."""
        self.assertFalse(HostRule.parse("10.").matches_address(address("fd00::1"), 1))

    @given(st.ip_addresses(v=4), st.integers(0, 32))
    def test_ipv4_inside_cidr(self, ip, prefix):
        """Any IPv4 address matches every CIDR built around it."""
        network = ipaddress.ip_network("%s/%d" % (ip, prefix), strict=False)
        self.assertTrue(HostRule.parse(str(network)).matches_address(ip, 443))

    @given(st.ip_addresses(v=6), st.integers(0, 128))
    def test_ipv6_inside_cidr(self, ip, prefix):
        """Any IPv6 address, normalised, matches every CIDR built around it."""
        # A mapped address is IPv4: only a rule inside ::ffff:0:0/96 covers it.
        assume(ip.ipv4_mapped is None or prefix >= 96)
        network = ipaddress.ip_network("%s/%d" % (ip, prefix), strict=False)
        rule = HostRule.parse(str(network))
        self.assertTrue(rule.matches_address(normalise_address(ip), 443))


class LimitRuleTests(SynchronousTestCase):
    """L{LimitRule} protocols."""

    def test_protocols(self):
        """tcp admits tcp only, udp udp only, both or absent admits both."""
        self.assertEqual(LimitRule.parse("a", "tcp").admits("udp"), False)
        self.assertEqual(LimitRule.parse("a", "UDP").admits("udp"), True)
        self.assertEqual(LimitRule.parse("a", None).admits("udp"), True)
        self.assertEqual(LimitRule.parse("a", "both").admits("tcp"), True)

    def test_bad_protocol(self):
        """An unknown protocol raises ValueError."""
        self.assertRaises(ValueError, LimitRule.parse, "a", "icmp")


class CheckNameTests(SynchronousTestCase):
    """L{AccessPolicy.check_name}, before DNS."""

    def test_forbidden_name(self):
        """A forbidden name is refused whatever its case or trailing dot."""
        acl = policy(forbidden=["internal.example.com"])
        self.assertEqual(acl.check_name("INTERNAL.example.com.", 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("example.com", 80, "tcp"))

    def test_forbidden_literal(self):
        """A literal IP inside a forbidden network is refused before DNS."""
        acl = policy(forbidden=["169.254.0.0/16", "fd00::/8"])
        self.assertEqual(acl.check_name("169.254.169.254", 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_name("[fd00::1]", 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("8.8.8.8", 53, "udp"))

    def test_mapped_literal(self):
        """An IPv4-mapped IPv6 literal cannot bypass an IPv4 rule."""
        acl = policy(forbidden=["10."])
        self.assertEqual(acl.check_name("::ffff:10.0.0.1", 80, "tcp"), Reason.NOT_ALLOWED)

    def test_forbidden_port_only(self):
        """A forbidden rule with a port leaves other ports alone."""
        acl = policy(forbidden=["db.example.com:5432"])
        self.assertEqual(acl.check_name("db.example.com", 5432, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("db.example.com", 443, "tcp"))

    def test_udp_off(self):
        """With allow_udp off, UDP is refused as a protocol."""
        acl = policy(allow_udp=False)
        self.assertEqual(acl.check_name("example.com", 53, "udp"), Reason.PROTOCOL_NOT_ALLOWED)
        self.assertIsNone(acl.check_name("example.com", 53, "tcp"))

    def test_bad_protocol(self):
        """A protocol other than tcp/udp is a programming error."""
        self.assertRaises(ValueError, policy().check_name, "example.com", 1, "icmp")


class CheckResolvedTests(SynchronousTestCase):
    """L{AccessPolicy.check_resolved}, after DNS."""

    def test_any_address_forbidden(self):
        """One forbidden address among several refuses the request."""
        acl = policy(forbidden=["192.168.1."])
        reason = acl.check_resolved("evil.example", 80, "tcp", ["8.8.8.8", "192.168.1.7"])
        self.assertEqual(reason, Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_resolved("ok.example", 80, "tcp", ["8.8.8.8"]))

    def test_mapped_address_forbidden(self):
        """A mapped IPv6 address from DNS is checked as IPv4."""
        acl = policy(forbidden=["10.0.0.0/8"])
        reason = acl.check_resolved("x.example", 80, "tcp", [address("::ffff:10.9.9.9")])
        self.assertEqual(reason, Reason.NOT_ALLOWED)

    def test_name_still_checked(self):
        """check_resolved repeats the name check."""
        acl = policy(forbidden=["*.corp.example"])
        self.assertEqual(acl.check_resolved("a.corp.example", 1, "tcp", ["8.8.8.8"]), Reason.NOT_ALLOWED)

    def test_allow_by_name(self):
        """An allow entry matching the asked name admits it whatever it resolves to."""
        acl = policy(allowed=[("localhost:8080", "tcp")])
        self.assertIsNone(acl.check_resolved("localhost", 8080, "tcp", ["127.0.0.1"]))
        self.assertEqual(acl.check_resolved("localhost", 8081, "tcp", ["127.0.0.1"]), Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("other", 8080, "tcp", ["127.0.0.1"]), Reason.NOT_ALLOWED)

    def test_allow_by_literal(self):
        """An allow network admits a literal IP inside it."""
        acl = policy(allowed=[("10.0.0.0/24", None)])
        self.assertIsNone(acl.check_resolved("10.0.0.7", 22, "tcp", ["10.0.0.7"]))
        self.assertEqual(acl.check_resolved("10.0.1.7", 22, "tcp", ["10.0.1.7"]), Reason.NOT_ALLOWED)

    def test_allow_by_every_address(self):
        """A name is admitted by addresses only when every address is allowed."""
        acl = policy(allowed=[("10.0.0.0/24", None)])
        self.assertIsNone(acl.check_resolved("lab.example", 22, "tcp", ["10.0.0.1", "10.0.0.2"]))
        reason = acl.check_resolved("lab.example", 22, "tcp", ["10.0.0.1", "8.8.8.8"])
        self.assertEqual(reason, Reason.NOT_ALLOWED)

    def test_allow_no_addresses(self):
        """No addresses never satisfies the every-address test."""
        acl = policy(allowed=[("10.0.0.0/24", None)])
        self.assertEqual(acl.check_resolved("lab.example", 22, "tcp", []), Reason.NOT_ALLOWED)

    def test_allow_protocol(self):
        """A tcp entry does not admit udp, and the refusal names the protocol."""
        acl = policy(allowed=[("dns.example:53", "tcp")])
        self.assertIsNone(acl.check_resolved("dns.example", 53, "tcp", ["10.0.0.53"]))
        reason = acl.check_resolved("dns.example", 53, "udp", ["10.0.0.53"])
        self.assertEqual(reason, Reason.PROTOCOL_NOT_ALLOWED)

    def test_forbidden_beats_allowed(self):
        """An allowed name that resolves to a forbidden address is refused."""
        acl = policy(forbidden=["169.254.0.0/16"], allowed=[("meta.example", None)])
        reason = acl.check_resolved("meta.example", 80, "tcp", ["169.254.169.254"])
        self.assertEqual(reason, Reason.NOT_ALLOWED)

    def test_garbage_address(self):
        """An address that is not an IP refuses rather than raises."""
        self.assertEqual(policy().check_resolved("x", 1, "tcp", ["nonsense"]), Reason.NOT_ALLOWED)

    @given(st.ip_addresses(v=4))
    def test_mapped_never_bypasses(self, ip):
        """Any IPv4 address forbidden as such is also forbidden in mapped form."""
        acl = policy(forbidden=["%s/32" % (ip,)])
        mapped = "::ffff:%s" % (ip,)
        self.assertEqual(acl.check_resolved(mapped, 80, "tcp", [mapped]), Reason.NOT_ALLOWED)
