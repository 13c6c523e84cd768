(function () {
  var POLL_MS = 1000;
  function setText(id, text) {
    var node = byId(id);
    if (node.textContent !== text) { node.textContent = text; }
  }
  function cell(row, name, text, numeric, title) {
    var td = document.createElement("td");
    td.className = name + (numeric ? " num" : "");
    td.textContent = text;
    if (title) { td.title = title; }
    row.appendChild(td);
  }
  function fill(bodyId, rows, columns, emptyText) {
    var body = byId(bodyId);
    if (!rows.length) {
      var row = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = columns;
      td.className = "empty";
      td.textContent = emptyText;
      row.appendChild(td);
      rows = [row];
    }
    body.replaceChildren.apply(body, rows);
  }
  function render(data) {
    var c = data.client;
    setText("client-id", c.client_id);
    setText("software", c.software);
    setText("group", c.group);
    setText("uptime", duration(c.uptime));
    setText("active-streams", String(c.active_streams));
    setText("refusal-total", String(c.acl_refusals));
    fill("tunnels-body", data.tunnels.map(function (t) {
      var row = document.createElement("tr");
      row.className = t.state;
      row.dataset.gateway = t.gateway;
      cell(row, "gateway", t.gateway);
      cell(row, "replica", String(t.replica), true);
      cell(row, "state", t.state);
      cell(row, "since", known(t.since) ? duration(t.connected_for) : "",
           known(t.since) ? "since " + clock(t.since) : "");
      cell(row, "rtt", known(t.rtt_ms) ? t.rtt_ms.toFixed(1) + " ms" : "n/a", true,
           known(t.rtt_age) ? "measured " + duration(t.rtt_age) + " ago" : "");
      cell(row, "streams", known(t.active_streams) ? String(t.active_streams) : "", true);
      cell(row, "node", t.node || "");
      cell(row, "last-error", t.last_error || "",
           false, known(t.last_error_at) ? clock(t.last_error_at) : "");
      return row;
    }), 8, "No gateway configured");
    fill("refusals-body", data.refusals.map(function (r) {
      var row = document.createElement("tr");
      cell(row, "when", clock(r.when));
      cell(row, "protocol", r.protocol);
      cell(row, "target", r.host + ":" + r.port);
      cell(row, "rule", r.rule);
      return row;
    }), 4, "No refusals");
    fill("ports-body", data.open_ports.map(function (p) {
      var row = document.createElement("tr");
      row.className = p.state === "refused" ? "refused" : "";
      cell(row, "gateway", p.gateway);
      cell(row, "port", p.remote_port + "/" + p.protocol, true);
      cell(row, "target", p.target);
      cell(row, "port-state", p.state);
      cell(row, "error", p.error || "");
      return row;
    }), 5, "No forwarded ports (client.open_ports)");
  }
  function apiUrl() {
    // A page opened as http://user:password@host/ resolves relative URLs
    // with the login in them, which fetch() refuses: drop it (the browser
    // sends the login it already has).
    var url = new URL("api/status", window.location.href);
    url.username = "";
    url.password = "";
    return url.href;
  }
  function poll() {
    fetch(apiUrl(), {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (data) {
        render(data);
        var state = byId("state");
        state.className = "state";
        state.textContent = "live";
      })
      .catch(function (e) {
        var state = byId("state");
        state.className = "state stale";
        state.textContent = "stale: " + e.message;
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
}());
