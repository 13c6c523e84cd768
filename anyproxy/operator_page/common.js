"use strict";
// Shared by the gateway's and the client's status pages: put before each
// page's own script by anyproxy.operator_site.self_contained_page.
function byId(id) { return document.getElementById(id); }
function known(n) { return n !== null && n !== undefined; }
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
