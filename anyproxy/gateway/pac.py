# -*- test-case-name: tests.test_pac -*-
"""
Browser profiles built from the routes clients announce (C{client.routes})
plus the gateway's configured extras: a proxy auto-config file
(C{/proxy.pac}) and a Clash profile (C{/clash.yaml}).  Destinations a route
covers go through the proxy; everything else goes DIRECT.

Routes are C{*.domain} patterns (the domain and every name under it),
exact names, and CIDRs.  A PAC file is run by the browser for every URL,
so this one never resolves names: a name is matched by its suffix, an IP
address (as typed, IPv4 or IPv6) against the networks.  A private name
that only resolves inside the site belongs in the routes as a name.
"""

import ipaddress
import json

import attr
import yaml


@attr.s(frozen=True, slots=True)
class Routes:
    """Name patterns and networks, deduplicated and in a stable order."""

    suffixes = attr.ib(default=())  # "corp.example" for "*.corp.example"
    names = attr.ib(default=())  # exact names
    networks = attr.ib(default=())  # ipaddress networks

    @classmethod
    def of(cls, patterns):
        """
        From route texts (C{"*.corp.example"}, C{"db.lan"}, C{"10.1.0.0/16"},
        C{"fd00::/8"}); raise L{ValueError} naming a bad one.
        """
        suffixes, names, networks = set(), set(), set()
        for pattern in patterns:
            text = pattern.strip().lower().rstrip(".")
            if not text:
                raise ValueError("empty route")
            try:
                networks.add(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if text.startswith("*."):
                text = text[2:]
                target = suffixes
            else:
                target = names
            if not text or not all(label and len(label) < 64 and
                                   all(c.isalnum() or c in "-_" for c in label)
                                   for label in text.split(".")):
                raise ValueError("%r is not a CIDR, a name or a *.domain pattern" % (pattern,))
            target.add(text)
        return cls(tuple(sorted(suffixes)), tuple(sorted(names)),
                   tuple(sorted(networks, key=lambda n: (n.version, n))))

    def __add__(self, other):
        return Routes.of([*("*." + s for s in self.suffixes + other.suffixes),
                          *self.names, *other.names,
                          *(str(n) for n in self.networks + other.networks)])

    def empty(self):
        return not (self.suffixes or self.names or self.networks)


def pac_file(routes, proxy):
    """
    The text of a PAC file sending C{routes} to C{proxy} and the rest DIRECT.

    @param proxy: the PAC directive, e.g. C{"PROXY gw.example.com:8080"} or
        C{"SOCKS5 gw.example.com:1080"}.
    """
    v4 = [[str(n.network_address), str(n.netmask)] for n in routes.networks if n.version == 4]
    v6 = [str(n) for n in routes.networks if n.version == 6]
    return PAC_TEMPLATE % {
        "proxy": json.dumps(proxy), "suffixes": json.dumps(list(routes.suffixes)),
        "names": json.dumps(list(routes.names)), "v4": json.dumps(v4), "v6": json.dumps(v6)}


PAC_TEMPLATE = """\
// AnyProxy: the routes its clients announce go through the proxy; the rest DIRECT.
var PROXY = %(proxy)s;
var SUFFIXES = %(suffixes)s;
var NAMES = %(names)s;
var NETS4 = %(v4)s;
var NETS6 = %(v6)s;

function FindProxyForURL(url, host) {
  host = host.toLowerCase();
  if (host.charAt(0) == "[") host = host.substring(1, host.length - 1);
  var i;
  for (i = 0; i < NAMES.length; i++) if (host == NAMES[i]) return PROXY;
  for (i = 0; i < SUFFIXES.length; i++) {
    var s = SUFFIXES[i];
    if (host == s || dnsDomainIs(host, "." + s)) return PROXY;
  }
  if (/^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$/.test(host)) {
    for (i = 0; i < NETS4.length; i++) if (isInNet(host, NETS4[i][0], NETS4[i][1])) return PROXY;
  } else if (host.indexOf(":") >= 0 && typeof isInNetEx == "function") {
    for (i = 0; i < NETS6.length; i++) if (isInNetEx(host, NETS6[i])) return PROXY;
  }
  return "DIRECT";
}
"""


def clash_profile(routes, proxy_type, server, port, name="anyproxy"):
    """
    A Clash profile (YAML) with one proxy and rules for C{routes}; the rest
    DIRECT.  The user adds their own C{username}/C{password}: the profile
    carries none.

    @param proxy_type: C{"http"} or C{"socks5"}.
    """
    rules = ["DOMAIN-SUFFIX,%s,%s" % (s, name) for s in routes.suffixes]
    rules += ["DOMAIN,%s,%s" % (n, name) for n in routes.names]
    rules += ["%s,%s,%s,no-resolve" % ("IP-CIDR" if n.version == 4 else "IP-CIDR6", n, name)
              for n in routes.networks]
    rules.append("MATCH,DIRECT")
    profile = {
        "mode": "rule",
        "proxies": [{"name": name, "type": proxy_type, "server": server, "port": port}],
        "proxy-groups": [{"name": "AnyProxy", "type": "select", "proxies": [name, "DIRECT"]}],
        "rules": rules,
    }
    return "# AnyProxy: the routes its clients announce, through the gateway.\n" + \
        yaml.safe_dump(profile, sort_keys=False, default_flow_style=False)
