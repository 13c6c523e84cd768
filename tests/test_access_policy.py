# -*- test-case-name: tests.test_access_policy -*-
"""
Tests for L{anyproxy.access_policy}.
"""

import ipaddress
import re
import time

from hypothesis import assume, example, given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anyproxy.access_policy import (
    AccessPolicy, HostRule, LimitRule, ends_in_number, normalise_address)
from anyproxy.errors import Reason


def policy(forbidden=(), allowed=(), allow_udp=True, allowed_hosts=()):
    """
    An L{AccessPolicy} from rule texts (C{forbidden}, C{allowed_hosts}) and
    C{(addr, protocol)} pairs (C{allowed}, the C{limit} entries).
    """
    return AccessPolicy(
        forbidden=tuple(HostRule.parse(text) for text in forbidden),
        allowed=tuple(LimitRule.parse(addr, protocol) for addr, protocol in allowed),
        allow_udp=allow_udp,
        allowed_hosts=tuple(HostRule.parse(text) for text in allowed_hosts),
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
                     "10.0.0.0/33", "300.1.", "1.2.3", "*.", "a..b", "-bad-.com",
                     "fd00::/200", ":22", "exa mple.com", "host:**", "*:0", "fd00::*",
                     "[fd00::*]:22", "a*b*c*d*e", "*..com", ".example.com", "(", "+a",
                     "[::1"]:
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


class GoRuleFormTests(SynchronousTestCase):
    """The Go AnyProxy's rule forms: C{:*}, C{*} as the host, globs, regexes."""

    def test_any_port(self):
        """C{:*} is any port, as no port is, after every kind of host."""
        for text, kind in [("localhost:*", "name"), ("*.example.com:*", "wildcard"),
                           ("10.0.0.0/8:*", "network"), ("192.168.1.0/24:*", "network"),
                           ("[::1]:*", "network"), ("10.:*", "network"), ("*:*", "any")]:
            rule = HostRule.parse(text)
            self.assertEqual((rule.kind, rule.port), (kind, None), text)

    def test_any_host(self):
        """C{*} as the host is any host: C{*}, C{*:*}, C{*:port}."""
        self.assertEqual(HostRule.parse("*"), HostRule.parse("*:*"))
        rule = HostRule.parse("*:22")
        self.assertEqual((rule.kind, rule.port), ("any", 22))

    def test_cidr_port_without_brackets(self):
        """The Go form C{192.168.1.0/24:22} is a network with a port."""
        rule = HostRule.parse("192.168.1.0/24:22")
        self.assertEqual((rule.value, rule.port), (ipaddress.ip_network("192.168.1.0/24"), 22))

    def test_glob(self):
        """A C{*} elsewhere in a name is a glob; C{*.domain} stays the wildcard."""
        self.assertEqual(HostRule.parse("api-*.Example.com:443").kind, "glob")
        self.assertEqual(HostRule.parse("*.*.example.com").kind, "glob")
        self.assertEqual(HostRule.parse("foo.*").kind, "glob")
        self.assertEqual(HostRule.parse("*.example.com").kind, "wildcard")

    def test_regex_forms(self):
        """The Go project's regex examples parse as regexes, with no port of their own."""
        for text in [r"evil\.com", r".*\.bad\.com", r"192\.168\.1\..*", r".*",
                     r".*\.trusted\.com:.*", r"^evil\.(com|org|net):.*$",
                     r"^(www\.)?example\.(com|org)$", r"localhost(:\d+)?", r"[a-z]+\.corp",
                     ".*.internal", "api.example.com:(80|443)", "a+b.example"]:
            rule = HostRule.parse(text)
            self.assertEqual((rule.kind, rule.port, rule.text), ("regex", None, text))

    def test_not_regex(self):
        """Names, addresses, CIDRs and bracketed IPv6 are never regexes."""
        for text in ["example.com", "127.0.0.1", "0.0.0.0", "::1", "[::1]:22", "fd00::/8",
                     "[fe80::1%eth0]:22", "*.example.com:*", "192.168.1.", "a_b.example"]:
            self.assertNotEqual(HostRule.parse(text).kind, "regex", text)

    def test_bad_regex_message(self):
        """A regex that does not compile: one line naming it."""
        error = self.assertRaises(ValueError, HostRule.parse, "(evil|bad\\.com")
        self.assertEqual(str(error), "bad regex '(evil|bad\\\\.com': missing ), unterminated "
                                     "subpattern at position 0")
        error = self.assertRaises(ValueError, HostRule.parse, "[[a]")
        self.assertIn("bad regex '[[a]': ", str(error))

    def test_costly_regexes_refused(self):
        """Patterns a backtracking matcher could take long on are refused at load."""
        for text, why in [("(a+)+", "exponential"), ("(a|aa)*b", "exponential"),
                          ("([a-z]+\\.)+example\\.com", "exponential"),
                          ("(a?a?)*", "exponential"),
                          (".*a.*a.*a.*b", "too many ways"), ("(.*a){4}", "too many ways"),
                          ("[a-z]+-[a-z]+-[a-z]+-[a-z]+", "too many ways"),
                          ("(?=a)a", "lookahead"), ("(?<!a)b", "lookahead"),
                          ("(a)\\1", "backreference"), ("(a)?(?(1)b|c)", "backreference")]:
            error = self.assertRaises(ValueError, HostRule.parse, text)
            self.assertIn("bad regex %r: " % (text,), str(error))
            self.assertIn(why, str(error))

    def test_three_repeats_allowed(self):
        """Three unbounded repeats in a row are allowed, and stay fast on the worst name."""
        rule = HostRule.parse(".*a.*a.*ab")
        started = time.perf_counter()
        self.assertFalse(rule.matches_name("a" * 253, 65535))
        self.assertLess(time.perf_counter() - started, 1.0)

    def test_glob_stars_bounded(self):
        """At most three C{*} in a glob (each is a '.*')."""
        self.assertEqual(HostRule.parse("*-*-*.example").kind, "glob")
        self.assertRaises(ValueError, HostRule.parse, "*-*-*-*.example")

    @given(st.text(alphabet="a.*+?|()[]{}0123,:\\", max_size=18))
    @example(".*a.*a.*ab")
    @example("(a|a)*b")
    def test_accepted_regexes_are_fast(self, text):
        """
        Whatever pattern is accepted matches the worst subjects (a name of
        253 characters of its own letters) within a fraction of a second.
        """
        try:
            rule = HostRule.parse(text)
        except ValueError:
            return
        for subject in ["a" * 253, "a." * 126 + "a", ":" * 253, "aa:" * 84]:
            # CPU time of this process, so a busy machine does not fail it: a
            # refused pattern would take seconds to minutes, accepted ones at
            # most about 0.15 s.
            started = time.process_time()
            rule.matches_name(subject, 65535)
            self.assertLess(time.process_time() - started, 1.0, (text, subject))

    @given(st.from_regex(re.compile(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", re.ASCII),
                         fullmatch=True), st.integers(1, 65535))
    def test_escaped_name_regex_is_exact(self, name, port):
        """C{re.escape(name)} as a rule matches that name on any port and nothing longer."""
        rule = HostRule.parse("^" + re.escape(name) + "$")
        self.assertEqual(rule.kind, "regex")
        self.assertTrue(rule.matches_name(name, port))
        self.assertFalse(rule.matches_name("x" + name, port))
        self.assertFalse(rule.matches_name(name + ".evil", port))


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
        """Literals in any spelling normalise, every time; names (and padded literals) are refused."""
        for _ in range(2):  # the second time from the cache
            self.assertEqual(normalise_address("[::ffff:10.0.0.1]"), ipaddress.IPv4Address("10.0.0.1"))
            self.assertEqual(normalise_address("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1"))
            self.assertRaises(ValueError, normalise_address, "example.com")
            self.assertRaises(ValueError, normalise_address, " 10.0.0.1")
            self.assertRaises(ValueError, normalise_address, "10.0.0.1%eth0")

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


class GoRuleMatchTests(SynchronousTestCase):
    """Matching with the Go forms."""

    def test_any_host_port(self):
        """C{*:22} matches any name or address on port 22 only."""
        rule = HostRule.parse("*:22")
        self.assertTrue(rule.matches_name("example.com", 22))
        self.assertTrue(rule.matches_address(address("fd00::1"), 22))
        self.assertFalse(rule.matches_name("example.com", 80))
        self.assertFalse(rule.matches_address(address("10.0.0.1"), 80))

    def test_host_any_port(self):
        """C{localhost:*} matches localhost on every port."""
        rule = HostRule.parse("localhost:*")
        self.assertTrue(rule.matches_name("localhost", 8080))
        self.assertFalse(rule.matches_name("localhost.evil", 8080))

    def test_subdomain_any_port(self):
        """C{*.example.com:*}: subdomains, any port, not the apex nor other domains."""
        rule = HostRule.parse("*.example.com:*")
        self.assertTrue(rule.matches_name("api.example.com", 443))
        self.assertFalse(rule.matches_name("example.com", 443))
        self.assertFalse(rule.matches_name("api.other.com", 443))

    def test_glob(self):
        """A glob matches the whole name (dots included), and IPv4 addresses as text."""
        rule = HostRule.parse("api-*.example.com:443")
        self.assertTrue(rule.matches_name("api-eu.example.com", 443))
        self.assertTrue(rule.matches_name("api-eu.west.example.com", 443))
        self.assertFalse(rule.matches_name("api-eu.example.com.evil", 443))
        self.assertFalse(rule.matches_name("api-eu.example.com", 80))
        rule = HostRule.parse("10.0.*")
        self.assertTrue(rule.matches_address(address("10.0.3.4"), 1))
        self.assertFalse(rule.matches_address(address("10.1.3.4"), 1))

    def test_regex_anchored(self):
        """A regex matches the whole host or the whole host:port, never a part."""
        rule = HostRule.parse(r"evil\.com")
        self.assertTrue(rule.matches_name("evil.com", 80))
        self.assertFalse(rule.matches_name("notevil.com", 80))
        self.assertFalse(rule.matches_name("evil.com.example.org", 80))
        rule = HostRule.parse(r".*\.trusted\.com:(80|443)")
        self.assertTrue(rule.matches_name("api.trusted.com", 443))
        self.assertFalse(rule.matches_name("api.trusted.com", 8443))
        self.assertFalse(rule.matches_name("trusted.com", 443))

    def test_regex_case_and_port_forms(self):
        """Case does not matter; C{(:\\d+)?} covers both subjects."""
        self.assertTrue(HostRule.parse(r"^EVIL\.(com|org|net):.*$").matches_name("evil.org", 1))
        rule = HostRule.parse(r"localhost(:\d+)?")
        self.assertTrue(rule.matches_name("localhost", 22))
        self.assertFalse(rule.matches_name("localhostx", 22))

    def test_regex_on_addresses(self):
        """A regex sees an address as text: C{10.0.0.5}, C{10.0.0.5:22}, C{[fd00::1]:22}."""
        rule = HostRule.parse(r"10\.0\.0\..*")
        self.assertTrue(rule.matches_address(address("10.0.0.5"), 22))
        self.assertFalse(rule.matches_address(address("10.0.1.5"), 22))
        self.assertTrue(HostRule.parse(r"\[fd00::1\]:22").matches_address(address("fd00::1"), 22))
        self.assertTrue(HostRule.parse(r"fd00::\d").matches_address(address("fd00::1"), 22))
        # A mapped address is matched as the IPv4 address it is.
        self.assertTrue(rule.matches_address(normalise_address("::ffff:10.0.0.9"), 22))


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


class AllowedHostsTests(SynchronousTestCase):
    """C{allowed_hosts}: an allow-list for TCP and UDP, combined with C{limit}."""

    def test_empty_allows_everything_not_forbidden(self):
        """No allowed_hosts (and no limit): anything not forbidden passes."""
        acl = policy(forbidden=["internal.example"])
        self.assertIsNone(acl.check_resolved("example.com", 80, "tcp", ["93.184.216.34"]))

    def test_by_name(self):
        """A matching name is admitted whatever it resolves to; others are refused."""
        acl = policy(allowed_hosts=["api.example.com:443", "*.trusted.example:*"])
        self.assertIsNone(acl.check_resolved("api.example.com", 443, "tcp", ["10.0.0.1"]))
        self.assertIsNone(acl.check_resolved("x.trusted.example", 8080, "udp", ["10.0.0.2"]))
        self.assertEqual(acl.check_resolved("api.example.com", 80, "tcp", ["10.0.0.1"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("example.com", 443, "tcp", ["10.0.0.1"]),
                         Reason.NOT_ALLOWED)

    def test_names_only_refused_before_dns(self):
        """With only name rules, a name none matches is refused before DNS."""
        acl = policy(allowed_hosts=["api.example.com", "*.example.org"])
        self.assertEqual(acl.check_name("other.example", 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("a.example.org", 80, "tcp"))
        # An address rule could still admit what a name resolves to.
        acl = policy(allowed_hosts=["api.example.com", "10.0.0.0/8"])
        self.assertIsNone(acl.check_name("other.example", 80, "tcp"))

    def test_by_every_address(self):
        """A name is admitted by address rules only when every address matches."""
        acl = policy(allowed_hosts=["10.0.0.0/24:*", r"192\.168\.7\.\d+:22"])
        self.assertIsNone(acl.check_resolved("lab.example", 22, "tcp", ["10.0.0.1", "192.168.7.9"]))
        self.assertEqual(acl.check_resolved("lab.example", 80, "tcp", ["10.0.0.1", "192.168.7.9"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("lab.example", 22, "tcp", ["10.0.0.1", "8.8.8.8"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("lab.example", 22, "tcp", []), Reason.NOT_ALLOWED)

    def test_literal(self):
        """A literal IP is matched as an address."""
        acl = policy(allowed_hosts=["*:22", "10.0.0.0/8"])
        self.assertIsNone(acl.check_resolved("8.8.8.8", 22, "tcp", ["8.8.8.8"]))
        self.assertIsNone(acl.check_resolved("10.1.2.3", 80, "tcp", ["10.1.2.3"]))
        self.assertEqual(acl.check_resolved("8.8.8.8", 80, "tcp", ["8.8.8.8"]), Reason.NOT_ALLOWED)

    def test_and_limit(self):
        """With both lists set a target must be in both; limit still names the protocol."""
        acl = policy(allowed_hosts=["*.example.com"], allowed=[("10.0.0.0/8", "tcp")])
        self.assertIsNone(acl.check_resolved("a.example.com", 80, "tcp", ["10.0.0.1"]))
        # In allowed_hosts, not in limit:
        self.assertEqual(acl.check_resolved("a.example.com", 80, "tcp", ["8.8.8.8"]),
                         Reason.NOT_ALLOWED)
        # In limit, not in allowed_hosts:
        self.assertEqual(acl.check_resolved("b.example.org", 80, "tcp", ["10.0.0.1"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("a.example.com", 53, "udp", ["10.0.0.1"]),
                         Reason.PROTOCOL_NOT_ALLOWED)

    def test_forbidden_beats_allowed_hosts(self):
        """An allowed name resolving to a forbidden address is refused (no rebinding)."""
        acl = policy(forbidden=["169.254.0.0/16", r"10\..*"], allowed_hosts=[".*"])
        self.assertEqual(acl.check_resolved("meta.example", 80, "tcp", ["169.254.169.254"]),
                         Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_resolved("rebind.example", 80, "tcp", ["8.8.8.8", "10.1.1.1"]),
                         Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_resolved("ok.example", 80, "tcp", ["8.8.8.8"]))

    def test_forbidden_go_forms(self):
        """Forbidden C{*:25}, a glob and a regex refuse names and addresses alike."""
        acl = policy(forbidden=["*:25", "*.internal.*", r"^evil\.(com|org):.*$"])
        self.assertEqual(acl.check_name("mail.example", 25, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_name("8.8.8.8", 25, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_name("db.internal.corp", 5432, "tcp"), Reason.NOT_ALLOWED)
        self.assertEqual(acl.check_name("EVIL.org.", 443, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("evil.net", 443, "tcp"))

    def test_long_name_refused(self):
        """A name longer than DNS allows is refused before any rule is matched."""
        acl = policy(allowed_hosts=[".*"])
        self.assertEqual(acl.check_name("a" * 254, 80, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_name("a" * 253, 80, "tcp"))

    def test_go_examples(self):
        """The Go project's own test table, where its meaning and ours agree."""
        cases = [
            ([], [], "example.com:80", True),
            ([r"evil\.com"], [], "evil.com:80", False),
            ([r".*\.evil\.com"], [], "subdomain.evil.com:443", False),
            ([], [r"good\.com"], "good.com:80", True),
            ([], [r".*\.trusted\.com"], "api.trusted.com:443", True),
            ([], [r"good\.com", r"trusted\.com"], "unknown.com:80", False),
            ([r".*\.evil\.com"], [r".*\.evil\.com"], "sub.evil.com:80", False),
            ([r"192\.168\.1\..*"], [r"10\.0\.0\..*"], "10.0.0.5:22", True),
            ([r".*\.internal\..*"], [r".*\.public\..*"], "api.public.example.com:443", True),
            ([], ["localhost:8080"], "localhost:8080", True),
            ([], ["192.168.1.0/24"], "192.168.1.10:80", True),
            (["192.168.1.0/24"], [], "192.168.1.10:80", False),
            ([], ["192.168.1.0/24"], "192.168.2.10:80", False),
            ([], ["192.168.1.0/24:22"], "192.168.1.10:22", True),
            ([], ["192.168.1.0/24:22"], "192.168.1.10:80", False),
            ([], ["192.168.1.0/24:*"], "192.168.1.10:8080", True),
            (["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], [], "10.1.1.1:80", False),
            ([], ["localhost:22"], "localhost:22", True),
            ([], ["localhost:22"], "localhost:80", False),
            ([], ["localhost:22"], "example.com:22", False),
            ([], ["localhost:*"], "localhost:8080", True),
            ([], ["*:22"], "example.com:22", True),
            ([], ["*:22"], "example.com:80", False),
            ([], ["*:*"], "anything.com:12345", True),
            ([], ["*.example.com:*"], "api.example.com:443", True),
            ([], ["*.example.com:*"], "api.other.com:443", False),
            (["192.168.1.0/24"], ["localhost:22", "example.com:80"], "localhost:22", True),
            (["192.168.1.0/24"], ["192.168.1.10:80"], "192.168.1.10:80", False),
            ([], [r"example\.com:80"], "example.com:80", True),
            ([r"^evil\.(com|org|net):.*$"], [], "evil.com:80", False),
            ([], ["[::1]:*"], "[::1]:8080", True),
            ([], ["*:65535"], "example.com:65535", True),
        ]
        for forbidden, allowed, target, expected in cases:
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            addresses = [host] if host[0].isdigit() or ":" in host else ["203.0.113.7"]
            acl = policy(forbidden=forbidden, allowed_hosts=allowed)
            got = acl.check_resolved(host, int(port), "tcp", addresses) is None
            self.assertEqual(got, expected, (forbidden, allowed, target))


class BypassTests(SynchronousTestCase):
    """Ways around the rules that a review found, each closed."""

    def test_unspecified_is_never_a_target(self):
        """0.0.0.0/8 and :: (Linux dials this host for them) are refused, as literals and from DNS."""
        acl = policy(forbidden=["127.0.0.0/8", "::1"])
        for host in ("0.0.0.0", "0.1.2.3", "::", "[::]", "::ffff:0.0.0.0"):
            self.assertEqual(acl.check_name(host, 8443, "tcp"), Reason.NOT_ALLOWED, host)
            self.assertEqual(acl.check_resolved(host, 8443, "udp", [host.strip("[]")]),
                             Reason.NOT_ALLOWED, host)
        self.assertEqual(acl.check_resolved("0", 8443, "tcp", ["0.0.0.0"]), Reason.NOT_ALLOWED)
        # Even with no rule at all.
        self.assertEqual(policy().check_resolved("sinkholed.example", 80, "tcp", ["0.0.0.0"]),
                         Reason.NOT_ALLOWED)
        self.assertIsNone(policy().check_resolved("ok.example", 80, "tcp", ["1.0.0.1"]))

    def test_address_glob_never_admits_a_name(self):
        """allowed_hosts 10.0.*: a name spelled like one of its addresses is judged by what it resolves to."""
        acl = policy(allowed_hosts=["10.0.*"])
        self.assertEqual(acl.check_resolved("10.0.1.attacker.example", 80, "tcp", ["192.168.1.1"]),
                         Reason.NOT_ALLOWED)
        self.assertIsNone(acl.check_resolved("10.0.1.attacker.example", 80, "tcp", ["10.0.9.9"]))
        self.assertIsNone(acl.check_name("10.0.3.4", 80, "tcp"))
        self.assertIsNone(acl.check_resolved("10.0.3.4", 80, "tcp", ["10.0.3.4"]))
        self.assertFalse(HostRule.parse("10.0.*").matches_name("10.0.x.example", 80))
        # A glob with letters still matches names.
        self.assertTrue(HostRule.parse("db-*.corp").matches_name("db-1.corp", 80))

    def test_short_ipv4_forms_refused(self):
        """'127.1', '2130706433', '0x7f.1': the resolver dials 127.0.0.1 for them, so no rule lets them by."""
        import socket
        deny = policy(forbidden=["127.0.0.0/8", "10.0.0.0/8"])
        for host in ("127.1", "2130706433", "0x7f.1", "0X7F.0.0.1", "10.1", "127.0.0.1.",
                     "10.0.0.1 ", "\uff11\uff10.\uff11", "example.0x"):
            self.assertEqual(deny.check_name(host, 22, "tcp"), Reason.NOT_ALLOWED, host)
            self.assertEqual(deny.check_resolved(host, 53, "udp", ()), Reason.NOT_ALLOWED, host)
            # A policy with no rule at all refuses them too.
            self.assertEqual(policy().check_name(host, 22, "tcp"), Reason.NOT_ALLOWED, host)
        # What the test is about: the system's resolver reads them as addresses, with no DNS.
        for host in ("127.1", "2130706433", "0x7f.1"):
            self.assertEqual(socket.getaddrinfo(host, 80, socket.AF_INET)[0][4][0], "127.0.0.1")
        # Names that merely hold digits are names; the canonical form is an address.
        for host in ("1.example", "123abc", "0x7f.example", "a.0xg1", "x1"):
            self.assertFalse(ends_in_number(host), host)
            self.assertIsNone(policy().check_name(host, 80, "tcp"), host)
        self.assertEqual(deny.check_name("127.0.0.1", 22, "tcp"), Reason.NOT_ALLOWED)
        self.assertIsNone(policy().check_name("127.0.0.1", 22, "tcp"))

    @given(st.from_regex(r"[0-9a-zA-Z.]{1,20}", fullmatch=True))
    def test_ends_in_number_covers_inet_aton(self, host):
        """Whatever inet_aton reads as an IPv4 address either is one in full or ends in a number."""
        import socket
        try:
            socket.inet_aton(host)
        except OSError:
            return
        self.assertTrue(ends_in_number(host) or normalise_address(host), host)

    def test_literal_is_exactly_an_address(self):
        """A zone on IPv4 or spaces make a name, not the address they surround."""
        acl = policy(allowed_hosts=["10.0.0.5"])
        for host in ("10.0.0.5%x", " 10.0.0.5", "10.0.0.5\t"):
            self.assertEqual(acl.check_resolved(host, 80, "tcp", ["192.168.1.1"]),
                             Reason.NOT_ALLOWED, host)
        acl = policy(allowed_hosts=["fe80::/10"])
        self.assertIsNone(acl.check_resolved("fe80::1%eth0", 80, "tcp", ["fe80::1%eth0"]))
