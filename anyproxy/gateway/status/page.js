(function () {
  var POLL_MS = 1000;
  function count(n) { return known(n) ? String(n) : "n/a"; }
  function bytes(n) {
    if (!known(n)) { return "n/a"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], value = n, i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return (i ? value.toFixed(1) : String(value)) + " " + units[i];
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
  function button(label, action, id, danger) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.id = id;
    if (danger) { b.className = "danger"; }
    return b;
  }
  function actions(row, buttons) {
    var td = document.createElement("td");
    td.className = "actions";
    buttons.forEach(function (b) { td.appendChild(b); });
    row.appendChild(td);
  }
  function emptyRow(columns, text) {
    var row = document.createElement("tr"), td = document.createElement("td");
    td.colSpan = columns;
    td.className = "empty";
    td.textContent = text;
    row.appendChild(td);
    return row;
  }
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
      if (c.draining) { row.className = "draining"; }
      cell(row, "client-id", c.client_id);
      cell(row, "group", c.group);
      // client.routes: what it can reach; none announced = anything.
      cell(row, "routes", c.routes && c.routes.length ? c.routes.join(", ") : "anything");
      cell(row, "credential", c.credential);
      cell(row, "address", c.address);
      cell(row, "version", c.version);
      cell(row, "since", clock(c.connected_at), false, duration(c.connected_for) + " ago");
      cell(row, "active-streams", count(c.active_streams), true);
      cell(row, "streams-opened", count(c.streams_opened), true);
      cell(row, "bytes-in", bytes(c.bytes_in), true, exact(c.bytes_in));
      cell(row, "bytes-out", bytes(c.bytes_out), true, exact(c.bytes_out));
      var drain = button(c.draining ? "draining" : "drain", "drain", c.client_id);
      var disconnect = button("disconnect", "disconnect", c.client_id, true);
      drain.disabled = !!c.draining;
      drain.dataset.group = disconnect.dataset.group = c.group;
      actions(row, [drain, disconnect]);
      rows.push(row);
    });
    if (!rows.length) { rows.push(emptyRow(12, "No clients connected.")); }
    body.replaceChildren.apply(body, rows);
  }
  function relayed(id, side) {
    setText(id, count(side.active) + " open");
    setText(id + "-detail", count(side.opened) + " opened, " + count(side.failed) + " failed; " +
      bytes(side.bytes_in) + " in, " + bytes(side.bytes_out) + " out");
  }
  function renderFleet(fleet) {
    var section = byId("fleet");
    section.hidden = !fleet;
    if (!fleet) { return; }
    var registry = fleet.registry, body = byId("fleet-nodes-body"), rows = [];
    setText("fleet-node", fleet.node);
    var registryState = byId("fleet-registry");
    registryState.className = registry.healthy ? "state" : "state stale";
    setText("fleet-registry", registry.healthy ? "healthy" : "unreachable",
      known(registry.view_age) ? "last answer " + registry.view_age.toFixed(1) + " s ago" : "");
    setText("fleet-links", fleet.links.dialed + " dialed, " + fleet.links.accepted + " accepted");
    relayed("fleet-sent", fleet.relayed.sent);
    relayed("fleet-served", fleet.relayed.served);
    setText("fleet-ports", String(fleet.ports.length), fleet.ports.map(function (p) {
      return p.port + ": " + p.client_id + " (" + p.group + ")"; }).join(", "));
    fleet.nodes.forEach(function (n) {
      var row = document.createElement("tr");
      row.dataset.nodeId = n.node_id;
      row.className = (n.self ? "this-node" : "") + (n.draining ? " draining" : "");
      cell(row, "node-id", n.node_id + (n.self ? " (this node)" : ""));
      cell(row, "tunnel-addr", n.tunnel_addr);
      cell(row, "peer-addr", n.peer_addr);
      cell(row, "groups", n.groups.length ? n.groups.join(", ") : "none");
      cell(row, "tunnels", count(n.tunnels), true);
      cell(row, "streams", count(n.streams), true);
      cell(row, "node-state", n.draining ? "draining" : "serving");
      rows.push(row);
    });
    body.replaceChildren.apply(body, rows);
  }
  function renderStreams(data) {
    var body = byId("streams-body"), rows = [];
    data.streams.forEach(function (s) {
      var row = document.createElement("tr");
      row.dataset.streamId = s.id;
      cell(row, "stream-id", s.id);
      cell(row, "user", s.user);
      cell(row, "source", s.source);
      cell(row, "frontend", s.frontend);
      cell(row, "target", s.target);
      cell(row, "client-id", s.client_id);
      cell(row, "age", duration(s.age), true);
      cell(row, "bytes-up", bytes(s.bytes_up), true, exact(s.bytes_up));
      cell(row, "bytes-down", bytes(s.bytes_down), true, exact(s.bytes_down));
      actions(row, [button("close", "close", s.id, true)]);
      rows.push(row);
    });
    if (!rows.length) { rows.push(emptyRow(10, "No open streams.")); }
    body.replaceChildren.apply(body, rows);
  }
  function fresh(ok, text) {
    var state = byId("state");
    state.className = ok ? "state" : "state stale";
    state.textContent = text;
  }
  function apiUrl(path) {
    // Relative, so the page works behind a path prefix; and without the
    // user:password of a page opened with a login in its address, which
    // fetch() refuses (the browser sends the login it already has).
    var url = new URL("api/" + path, window.location.href);
    url.username = "";
    url.password = "";
    return url.href;
  }
  function getJson(path) {
    return fetch(apiUrl(path), {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      });
  }
  var timer = null;
  function poll() {
    if (timer !== null) { window.clearTimeout(timer); timer = null; }
    Promise.all([getJson("status"), getJson("streams")])
      .then(function (answers) {
        render(answers[0]);
        renderFleet(answers[0].fleet);
        renderStreams(answers[1]);
        fresh(true, "live, updated " + clock(answers[0].gateway.now).slice(11));
      })
      .catch(function (e) { fresh(false, "not updating: " + e.message); })
      .then(function () { timer = window.setTimeout(poll, POLL_MS); });
  }
  // The buttons: state-changing calls carry X-AnyProxy-Request, which the
  // API requires (a cross-origin page cannot send it: CSRF defence).
  // A client's buttons act on its group only: two tenants' clients may
  // have the same id.
  function inGroup(group) { return group ? "?group=" + encodeURIComponent(group) : ""; }
  var ACTIONS = {
    close: {method: "DELETE", path: function (id) { return "streams/" + encodeURIComponent(id); },
            ask: "Close stream %s?", done: "Stream %s closed."},
    drain: {method: "POST", path: function (id, group) {
      return "clients/" + encodeURIComponent(id) + "/drain" + inGroup(group); },
            ask: "Drain client %s? Its tunnels take no new streams; open ones finish.",
            done: "Client %s draining."},
    disconnect: {method: "DELETE", path: function (id, group) {
      return "clients/" + encodeURIComponent(id) + inGroup(group); },
            ask: "Disconnect client %s? Its open streams are reset.",
            done: "Client %s disconnected."}
  };
  function report(ok, text) {
    var node = byId("action-result");
    node.className = ok ? "action-result" : "action-result failed";
    node.textContent = text;
  }
  function act(event) {
    var target = event.target, action = ACTIONS[target.dataset && target.dataset.action];
    if (!action || target.tagName !== "BUTTON") { return; }
    var id = target.dataset.id, group = target.dataset.group;
    var name = group ? id + " (group " + group + ")" : id;
    // split/join, not replace: "$&" or "$'" in a client id would be read as patterns.
    if (!window.confirm(action.ask.split("%s").join(name))) { return; }
    target.disabled = true;
    fetch(apiUrl(action.path(id, group)), {method: action.method, cache: "no-store",
                                    credentials: "same-origin",
                                    headers: {"X-AnyProxy-Request": "1"}})
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) { throw new Error(body.error || "HTTP " + response.status); }
          report(true, action.done.split("%s").join(name));
        });
      })
      .catch(function (e) { report(false, "Failed: " + e.message); })
      .then(poll);
  }
  byId("clients-body").addEventListener("click", act);
  byId("streams-body").addEventListener("click", act);
  poll();
}());
