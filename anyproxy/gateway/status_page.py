# -*- test-case-name: tests.test_e2e_status -*-
"""
The HTML of the gateway's status page (served by L{anyproxy.gateway.status}).

One self-contained document: no external scripts, styles, fonts or images.
Its script polls C{api/status} (relative, so the page also works behind a
path prefix) once a second and rewrites the DOM with C{textContent} only, so
a client id or address can never inject markup.  The Content-Security-Policy
allows exactly this script and this style, by hash, and fetches to the same
origin.
"""

import base64
import hashlib

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f6f7f9; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.5em 0 .5em; }
.meta { color: #5b6475; }
.state { display: inline-block; padding: 0 .5em; border-radius: 3px; color: #fff; background: #2f8f46; }
.state.stale { background: #b3261e; }
.totals { display: flex; flex-wrap: wrap; gap: .8em; }
.total { background: #fff; border: 1px solid #d9dde5; border-radius: 6px; padding: .6em 1em; min-width: 8em; }
.total .label { color: #5b6475; font-size: .85em; }
.total .value { font-size: 1.6em; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border: 1px solid #d9dde5; padding: .35em .6em; text-align: left; }
th { background: #eceff4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: #5b6475; font-style: italic; }
"""

SCRIPT = """
"use strict";
(function () {
  var POLL_MS = 1000;
  function byId(id) { return document.getElementById(id); }
  function known(n) { return n !== null && n !== undefined; }
  function count(n) { return known(n) ? String(n) : "n/a"; }
  function bytes(n) {
    if (!known(n)) { return "n/a"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], value = n, i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return (i ? value.toFixed(1) : String(value)) + " " + units[i];
  }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function clock(t) {
    var d = new Date(t * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function duration(seconds) {
    var s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
    s = s % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }
  function setText(id, text, title) {
    var node = byId(id);
    if (node.textContent !== text) { node.textContent = text; }
    if (title !== undefined) { node.title = title; }
  }
  function cell(row, name, text, numeric, title) {
    var td = document.createElement("td");
    td.className = name + (numeric ? " num" : "");
    td.textContent = text;
    if (title) { td.title = title; }
    row.appendChild(td);
  }
  function exact(n) { return known(n) ? n + " bytes" : ""; }
  function render(data) {
    var totals = data.totals, body = byId("clients-body"), rows = [];
    setText("software", data.gateway.software);
    setText("uptime", duration(data.gateway.uptime));
    setText("total-tunnels", count(totals.tunnels));
    setText("total-clients", count(totals.clients));
    setText("total-active-streams", count(totals.active_streams));
    setText("total-streams-opened", count(totals.streams_opened));
    setText("total-bytes-in", bytes(totals.bytes_in), exact(totals.bytes_in));
    setText("total-bytes-out", bytes(totals.bytes_out), exact(totals.bytes_out));
    setText("scope", totals.since_start ? "Traffic totals since the gateway started" :
      "Traffic totals over the clients connected now");
    data.clients.forEach(function (c) {
      var row = document.createElement("tr");
      row.dataset.clientId = c.client_id;
      cell(row, "client-id", c.client_id);
      cell(row, "group", c.group);
      cell(row, "credential", c.credential);
      cell(row, "address", c.address);
      cell(row, "version", c.version);
      cell(row, "since", clock(c.connected_at), false, duration(c.connected_for) + " ago");
      cell(row, "active-streams", count(c.active_streams), true);
      cell(row, "streams-opened", count(c.streams_opened), true);
      cell(row, "bytes-in", bytes(c.bytes_in), true, exact(c.bytes_in));
      cell(row, "bytes-out", bytes(c.bytes_out), true, exact(c.bytes_out));
      rows.push(row);
    });
    if (!rows.length) {
      var row = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = 9;
      td.className = "empty";
      td.textContent = "No clients connected.";
      row.appendChild(td);
      rows.push(row);
    }
    body.replaceChildren.apply(body, rows);
  }
  function fresh(ok, text) {
    var state = byId("state");
    state.className = ok ? "state" : "state stale";
    state.textContent = text;
  }
  function poll() {
    fetch("api/status", {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (data) {
        render(data);
        fresh(true, "live, updated " + clock(data.gateway.now).slice(11));
      })
      .catch(function (e) { fresh(false, "not updating: " + e.message); })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }
  poll();
}());
"""

_BODY = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>AnyProxy gateway status</title>
<style>%(style)s</style>
</head>
<body>
<h1>AnyProxy gateway</h1>
<p class="meta"><span id="software">anyproxy</span> &middot; up <span id="uptime">?</span>
&middot; <span id="state" class="state stale">loading&hellip;</span></p>
<h2>Totals</h2>
<div class="totals">
<div class="total"><div class="label">Tunnels</div><div class="value" id="total-tunnels">?</div></div>
<div class="total"><div class="label">Clients</div><div class="value" id="total-clients">?</div></div>
<div class="total"><div class="label">Active streams</div>
<div class="value" id="total-active-streams">?</div></div>
<div class="total"><div class="label">Streams opened</div>
<div class="value" id="total-streams-opened">?</div></div>
<div class="total"><div class="label">Bytes in (from clients)</div>
<div class="value" id="total-bytes-in">?</div></div>
<div class="total"><div class="label">Bytes out (to clients)</div>
<div class="value" id="total-bytes-out">?</div></div>
</div>
<h2>Connected clients</h2>
<table id="clients">
<thead><tr><th>Client</th><th>Group</th><th>Credential</th><th>Address</th><th>Version</th><th>Connected since</th>
<th>Active streams</th><th>Streams opened</th><th>Bytes in</th><th>Bytes out</th></tr></thead>
<tbody id="clients-body"></tbody>
</table>
<p class="meta"><span id="scope">Traffic totals</span>; JSON at <code>api/status</code>.</p>
<script>%(script)s</script>
</body>
</html>
"""

PAGE = (_BODY % {"style": STYLE, "script": SCRIPT}).encode("utf-8")


def _hash_source(text):
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-%s'" % (base64.b64encode(digest).decode("ascii"),)


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    % (_hash_source(SCRIPT), _hash_source(STYLE))).encode("ascii")
