# -*- test-case-name: tests.test_management_api -*-
"""
C{anyproxy-ctl}: the gateway's management API from a shell.

    anyproxy-ctl --url http://127.0.0.1:8090 --user admin --password-file pw streams
    anyproxy-ctl ... tunnels | users | kick STREAM_ID | disconnect CLIENT_ID
    anyproxy-ctl ... drain CLIENT_ID | drain-gateway | reload | config   [--json]

The password is read from a file (C{--password-file}, C{-} for standard
input) or the C{ANYPROXY_CTL_PASSWORD} environment variable, never from the
command line, where other users of the machine could read it.

Tables go to standard output; C{--json} prints the API's answer as it came.
Exit codes: 0 done, 1 the gateway refused or failed (its message on
standard error; 3 for a stream or client it does not know), 2 bad usage or
no answer (connection refused, timeout, bad TLS, a redirect, an answer that
is not the API's).  The login goes to C{--url} only: no redirect is followed
and no proxy is taken from the environment.
"""

import argparse
import base64
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
# State-changing calls carry this header: a browser cannot send it across
# origins without a CORS preflight the API never grants (CSRF defence).
CSRF_HEADER = "X-AnyProxy-Request"


class CtlError(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _read_password(args, stdin):
    # The line's end, "\r\n" as a Windows editor writes it too, is no part of it.
    if args.password_file == "-":
        return stdin.readline().rstrip("\r\n")
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise CtlError("cannot read --password-file: %s" % (e.strerror,), EXIT_USAGE)
        except UnicodeDecodeError:
            raise CtlError("--password-file is not UTF-8 text", EXIT_USAGE)
    password = os.environ.get("ANYPROXY_CTL_PASSWORD")
    if password is None:
        raise CtlError("give the password with --password-file FILE (or - for stdin), or "
                       "in ANYPROXY_CTL_PASSWORD", EXIT_USAGE)
    return password


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """
    The API never redirects, and urllib would send the login (the
    Authorization header) on to wherever a redirect pointed: refused.
    """

    def redirect_request(self, request, fp, code, message, headers, new_url):
        raise CtlError("%s %s: the answer was a redirect (%d) to %s; not followed, since the "
                       "login would go with it (is --url the gateway's status address?)"
                       % (request.get_method(), urllib.parse.urlsplit(request.full_url).path,
                          code, new_url[:200]), EXIT_USAGE)


def _opener(url, cacert):
    # No proxy from the environment (http_proxy...): the login is for the
    # gateway alone, and the status address is normally on a private network.
    handlers = [urllib.request.ProxyHandler({}), _NoRedirects()]
    if url.startswith("https:"):
        try:
            context = ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise CtlError("cannot use --cacert %s: %s" % (cacert, getattr(e, "strerror", None)
                                                           or e), EXIT_USAGE)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def call(args, method, path, password, stdin=None):
    """The decoded JSON answer of C{method path} (C{None} for 204)."""
    url = args.url.rstrip("/") + path
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CtlError("--url must start with http:// or https://, not %r" % (args.url,),
                       EXIT_USAGE)
    request = urllib.request.Request(url, method=method)
    token = base64.b64encode(("%s:%s" % (args.user, password)).encode("utf-8")).decode("ascii")
    request.add_header("Authorization", "Basic " + token)
    request.add_header("Accept", "application/json")
    if method != "GET":
        request.add_header(CSRF_HEADER, "1")
    opener = _opener(url, args.cacert)
    try:
        with opener.open(request, timeout=args.timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            message = json.loads(body).get("error", "")
        except (ValueError, AttributeError):
            message = body.decode("utf-8", "replace").strip()[:200]
        code = EXIT_NOT_FOUND if e.code == 404 else EXIT_REFUSED
        raise CtlError("%s %s: %d %s%s" % (method, path, e.code, e.reason,
                                          ": " + message if message else ""), code)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # HTTPException: what answered is not HTTP, or cut its answer short.
        reason = getattr(e, "reason", None) or e.__class__.__name__
        raise CtlError("no answer from %s: %s" % (args.url, reason), EXIT_USAGE)
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise CtlError(_NOT_THE_API % (method, path, args.url), EXIT_USAGE) from None


_NOT_THE_API = ("%s %s: the answer from %s is not the management API's JSON (is --url the "
                "gateway's status address?)")


def _table(rows, columns):
    """Rows of dicts as an aligned text table with the given C{(key, title)} columns."""
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append(["" if row.get(key) is None else str(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


STREAM_COLUMNS = [("id", "ID"), ("user", "USER"), ("source", "SOURCE"), ("frontend", "FRONTEND"),
                  ("target", "TARGET"), ("group", "GROUP"), ("client_id", "CLIENT"),
                  ("bytes_up", "UP"), ("bytes_down", "DOWN"), ("age", "AGE")]
TUNNEL_COLUMNS = [("client_id", "CLIENT"), ("group", "GROUP"), ("address", "ADDRESS"),
                  ("active_streams", "STREAMS"), ("draining", "DRAINING"),
                  ("connected_for", "CONNECTED")]
USER_COLUMNS = [("username", "USER"), ("groups", "GROUPS"), ("active_streams", "STREAMS"),
                ("max_streams", "MAX"), ("bandwidth", "BANDWIDTH"), ("protocols", "PROTOCOLS")]


def _round(rows, key):
    for row in rows:
        if isinstance(row.get(key), float):
            row[key] = "%.1fs" % (row[key],)
    return rows


def _client_path(args, action=""):
    """C{/api/clients/ID[/action]}, limited to C{--group} if given."""
    path = "/api/clients/" + urllib.parse.quote(args.client, safe="") + action
    if args.group:
        path += "?" + urllib.parse.urlencode({"group": args.group})
    return path


def _request(args):
    """The C{(method, path)} of the call C{args.command} makes."""
    command = args.command
    if command in ("streams", "tunnels", "users", "config"):
        return "GET", "/api/" + command
    if command == "kick":
        return "DELETE", "/api/streams/" + urllib.parse.quote(args.id, safe="")
    if command == "disconnect":
        return "DELETE", _client_path(args)
    if command == "drain":
        return "POST", _client_path(args, "/drain")
    if command == "drain-gateway":
        return "POST", "/api/drain"
    return "POST", "/api/reload"


def _text(args, answer):
    """What C{args.command} prints of the API's C{answer}."""
    command = args.command
    if command == "streams":
        return _table(_round(answer["streams"], "age"), STREAM_COLUMNS)
    if command == "tunnels":
        return _table(_round(answer["tunnels"], "connected_for"), TUNNEL_COLUMNS)
    if command == "users":
        for row in answer["users"]:
            row["groups"] = ",".join(row.get("groups") or ())
            row["protocols"] = ",".join(row.get("protocols") or ())
        return _table(answer["users"], USER_COLUMNS)
    if command == "kick":
        return "closed stream %s" % (args.id,)
    if command == "disconnect":
        return "disconnected %s (%d tunnels)" % (args.client, answer["tunnels"])
    if command == "drain":
        return "draining %s (%d tunnels, %d streams open)" % (
            args.client, answer["tunnels"], answer["active_streams"])
    if command == "drain-gateway":
        return "gateway draining (%d streams open)" % (answer["active_streams"],)
    if command == "reload":
        return "reloaded: %s" % (answer["summary"],) + "".join(
            "\n  needs a restart: %s" % (key,) for key in answer.get("restart_needed", ()))
    return json.dumps(answer, indent=2, sort_keys=True)


def run(args, password, stdout, stdin):
    method, path = _request(args)
    answer = call(args, method, path, password)
    if args.json:
        text = json.dumps(answer, indent=2, sort_keys=True)
    else:
        try:
            text = _text(args, answer)
        except (KeyError, TypeError, AttributeError, ValueError):
            # JSON, but not the shape this call answers: another service.
            raise CtlError(_NOT_THE_API % (method, path, args.url), EXIT_USAGE) from None
    stdout.write(text + "\n")
    return EXIT_OK


def _group_name(text):
    # An empty --group would leave the call unlimited: every group's client.
    if not text:
        raise argparse.ArgumentTypeError("a group name, not empty")
    return text


def parser():
    p = argparse.ArgumentParser(
        prog="anyproxy-ctl", description="Call an AnyProxy gateway's management API "
        "(on its status_addr, with the status login).")
    p.add_argument("--url", default=os.environ.get("ANYPROXY_CTL_URL", "http://127.0.0.1:8090"),
                   help="the gateway's status address (default: %(default)s or ANYPROXY_CTL_URL)")
    p.add_argument("--user", default=os.environ.get("ANYPROXY_CTL_USER", "admin"),
                   help="gateway.status_username (default: %(default)s or ANYPROXY_CTL_USER)")
    p.add_argument("--password-file", help="a file whose first line is the password; - = stdin")
    p.add_argument("--cacert", help="CA file to verify an https --url with")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("streams", help="list open streams")
    commands.add_parser("tunnels", help="list connected client tunnels")
    commands.add_parser("users", help="list users with their policy and open streams")
    kick = commands.add_parser("kick", help="close one stream")
    kick.add_argument("id", help="the stream's ID (see streams)")
    disconnect = commands.add_parser("disconnect", help="disconnect a client's tunnels")
    drain = commands.add_parser("drain", help="drain a client: no new streams, open ones finish")
    for each in (disconnect, drain):
        each.add_argument("client", help="the client id")
        each.add_argument("--group", type=_group_name,
                          help="only its tunnels of this group (clients of two groups may "
                               "have the same id)")
    commands.add_parser("drain-gateway", help="drain the whole gateway")
    commands.add_parser("reload", help="reload the gateway's config (as SIGHUP does)")
    commands.add_parser("config", help="show the effective config, secrets redacted")
    return p


def main(argv=None, stdin=None, stdout=None, stderr=None):
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        password = _read_password(args, stdin)
        return run(args, password, stdout, stdin)
    except CtlError as e:
        stderr.write("anyproxy-ctl: %s\n" % (e,))
        return e.code


if __name__ == "__main__":
    sys.exit(main())
