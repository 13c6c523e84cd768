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
      td.colSpan = 10;
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
  function statusUrl() {
    // Relative, so the page works behind a path prefix; and without the
    // user:password of a page opened with a login in its address, which
    // fetch() refuses (the browser sends the login it already has).
    var url = new URL("api/status", window.location.href);
    url.username = "";
    url.password = "";
    return url.href;
  }
  function poll() {
    fetch(statusUrl(), {cache: "no-store", credentials: "same-origin"})
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
