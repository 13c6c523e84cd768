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

import json

import yaml


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
    # The rules name the group, so a user may switch it to DIRECT in Clash.
    group = "AnyProxy"
    rules = ["DOMAIN-SUFFIX,%s,%s" % (s, group) for s in routes.suffixes]
    rules += ["DOMAIN,%s,%s" % (n, group) for n in routes.names]
    rules += ["%s,%s,%s,no-resolve" % ("IP-CIDR" if n.version == 4 else "IP-CIDR6", n, group)
              for n in routes.networks]
    rules.append("MATCH,DIRECT")
    profile = {
        "mode": "rule",
        "proxies": [{"name": name, "type": proxy_type, "server": server, "port": port}],
        "proxy-groups": [{"name": group, "type": "select", "proxies": [name, "DIRECT"]}],
        "rules": rules,
    }
    return "# AnyProxy: the routes its clients announce, through the gateway.\n" + \
        yaml.safe_dump(profile, sort_keys=False, default_flow_style=False)
