# -*- test-case-name: tests.test_management_api -*-
"""
The OpenAPI 3.1 description of the management API (C{GET /api/openapi.json};
L{anyproxy.gateway.status.management}).  The tests run schemathesis against
it on a live gateway, so it is checked against what the API answers.
"""

import copy

from anyproxy import __version__

_NUMBER_OR_NULL = {"type": ["integer", "null"]}

SCHEMAS = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {"type": "string", "description": "what went wrong"}},
    },
    "Status": {
        "type": "object", "required": ["gateway", "totals", "clients"],
        "properties": {
            "gateway": {
                "type": "object", "required": ["software", "started_at", "uptime", "now"],
                "properties": {"software": {"type": "string"}, "started_at": {"type": "number"},
                               "uptime": {"type": "number"}, "now": {"type": "number"}}},
            "totals": {
                "type": "object",
                "required": ["tunnels", "clients", "groups", "active_streams", "streams_opened",
                             "bytes_in", "bytes_out", "since_start"],
                "properties": {
                    "tunnels": {"type": "integer"}, "clients": {"type": "integer"},
                    "groups": {"type": "integer"}, "active_streams": {"type": "integer"},
                    "streams_opened": _NUMBER_OR_NULL, "bytes_in": _NUMBER_OR_NULL,
                    "bytes_out": _NUMBER_OR_NULL, "since_start": {"type": "boolean"}}},
            "clients": {"type": "array", "items": {"$ref": "#/components/schemas/TunnelStatus"}},
            "fleet": {"$ref": "#/components/schemas/FleetStatus"},
        },
    },
    "FleetStatus": {
        "type": "object", "additionalProperties": False,
        "description": "Only with gateway.fleet: the fleet as this node sees it (its cached "
                       "view of the registry; docs/FLEET.md).",
        "required": ["node", "nodes", "registry", "relayed", "links", "ports"],
        "properties": {
            "node": {"type": "string", "description": "this node's id"},
            "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/FleetNode"},
                      "description": "this node first, then every live other one"},
            "registry": {
                "type": "object", "additionalProperties": False,
                "required": ["healthy", "view_age", "errors"],
                "properties": {
                    "healthy": {"type": "boolean", "description": "the store (Redis) answers"},
                    "view_age": {"type": ["number", "null"],
                                 "description": "seconds since the store last answered"},
                    "errors": _NUMBER_OR_NULL}},
            "relayed": {
                "type": "object", "additionalProperties": False, "required": ["sent", "served"],
                "properties": {
                    "sent": {"$ref": "#/components/schemas/RelayedStreams"},
                    "served": {"$ref": "#/components/schemas/RelayedStreams"}}},
            "links": {
                "type": "object", "additionalProperties": False,
                "required": ["dialed", "accepted"],
                "properties": {"dialed": {"type": "integer"}, "accepted": {"type": "integer"}}},
            "ports": {
                "type": "array", "description": "forwarded ports this node holds fleet-wide",
                "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["port", "group", "client_id"],
                    "properties": {"port": {"type": "integer"}, "group": {"type": "string"},
                                   "client_id": {"type": "string"}}}},
        },
    },
    "FleetNode": {
        "type": "object", "additionalProperties": False,
        "required": ["node_id", "self", "peer_addr", "tunnel_addr", "groups", "streams",
                     "tunnels", "draining"],
        "properties": {
            "node_id": {"type": "string"},
            "self": {"type": "boolean", "description": "this node"},
            "peer_addr": {"type": "string", "description": "where peers relay to it"},
            "tunnel_addr": {"type": "string", "description": "where clients dial it"},
            "groups": {"type": "array", "items": {"type": "string"},
                       "description": "groups it holds a usable tunnel of"},
            "streams": {"type": "integer", "description": "streams open through it (its load)"},
            "tunnels": {"type": "integer"},
            "draining": {"type": "boolean"},
        },
    },
    "RelayedStreams": {
        "type": "object", "additionalProperties": False,
        "description": "sent: this gateway's users' streams opened on a peer; served: peers' "
                       "streams opened on our tunnels",
        "required": ["active", "opened", "failed", "bytes_in", "bytes_out"],
        "properties": {
            "active": {"type": "integer"}, "opened": {"type": "integer"},
            "failed": {"type": "integer"},
            "bytes_in": {"type": "integer", "description": "from users towards targets"},
            "bytes_out": {"type": "integer", "description": "back to users"}},
    },
    "TunnelStatus": {
        "type": "object",
        "required": ["client_id", "group", "credential", "address", "version", "weight",
                     "connected_at", "connected_for", "active_streams", "draining",
                     "streams_opened", "bytes_in", "bytes_out"],
        "properties": {
            "client_id": {"type": "string"}, "group": {"type": "string"},
            "credential": {"type": "string", "description": "the credential's name, never "
                                                            "its password"},
            "address": {"type": "string"}, "version": {"type": "string"},
            "weight": {"type": "number"}, "connected_at": {"type": "number"},
            "routes": {"type": "array", "items": {"type": "string"},
                       "description": "client.routes it announced; empty: serves anything"},
            "connected_for": {"type": "number"}, "active_streams": {"type": "integer"},
            "draining": {"type": "boolean",
                         "description": "GOAWAY sent or received: takes no new streams"},
            "streams_opened": _NUMBER_OR_NULL, "bytes_in": _NUMBER_OR_NULL,
            "bytes_out": _NUMBER_OR_NULL,
        },
    },
    "Stream": {
        "type": "object",
        "required": ["id", "user", "source", "frontend", "kind", "target", "group", "client_id",
                     "node", "opened", "age", "bytes_up", "bytes_down"],
        "properties": {
            "id": {"type": "string", "description": "the id DELETE /api/streams/{id} takes"},
            "user": {"type": "string"}, "source": {"type": "string",
                                                   "description": "the user's host:port"},
            "frontend": {"type": "string"}, "kind": {"type": "string", "enum": ["tcp", "udp"]},
            "target": {"type": "string", "description": "host:port as the user asked"},
            "group": {"type": "string"}, "client_id": {"type": "string"},
            "node": {"type": "string"},
            "opened": {"type": "number", "description": "seconds since the epoch"},
            "age": {"type": "number"},
            "bytes_up": {"type": "integer", "description": "user -> target"},
            "bytes_down": {"type": "integer", "description": "target -> user"},
        },
    },
    "User": {
        "type": "object",
        "required": ["username", "source", "groups", "listeners", "allow", "deny", "protocols",
                     "max_streams", "bandwidth", "active_streams"],
        "properties": {
            "username": {"type": "string"},
            "source": {"type": "string", "enum": ["listener", "gateway.users"]},
            "groups": {"type": "array", "items": {"type": "string"}},
            "listeners": {"type": "array", "items": {"type": "string"}},
            "allow": {"type": "array", "items": {"type": "string"},
                      "description": "rules as written; one limited to a protocol ends with it, "
                                     "e.g. \"10.1.0.0/16:22 (tcp)\""},
            "deny": {"type": "array", "items": {"type": "string"}},
            "protocols": {"type": "array", "items": {"type": "string"}},
            "max_streams": {"type": "integer", "description": "0 = unlimited"},
            "bandwidth": {"type": "integer", "description": "bytes per second; 0 = unlimited"},
            "active_streams": {"type": "integer"},
        },
    },
}


def _json(schema):
    return {"application/json": {"schema": schema}}


def _ref(name):
    return {"$ref": "#/components/schemas/%s" % (name,)}


def _list_of(key, name):
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": _ref(name)}}}


_ERRORS = {
    "400": "the request body is not a JSON object this call takes",
    "401": "no login, or a wrong one (with WWW-Authenticate: Basic)",
    "403": "a state-changing call without X-AnyProxy-Request, or from another origin",
    "404": "no such stream, client or path",
    "405": "the path exists, the method does not (Allow lists those that do)",
    "409": "the gateway is already draining, or the reload was refused",
    "413": "the request body is too large",
    "415": "a request body that is not application/json",
    "429": "too many failed logins from this address: try again after Retry-After seconds",
}

_CSRF_PARAMETER = {
    "name": "X-AnyProxy-Request", "in": "header", "required": True,
    "description": "Any non-empty value. A browser sends a custom header across origins "
                   "only after a CORS preflight, which this API never grants (CSRF defence).",
    "schema": {"type": "string", "enum": ["1"]},
}


def _operation(summary, ok_status, ok_schema, errors, description="", changes=False,
               parameters=(), body=None):
    responses = {ok_status: {"description": "done", "content": _json(ok_schema)}}
    for code in ["401"] + list(errors):
        responses[code] = {"description": _ERRORS[code], "content": _json(_ref("Error"))}
    responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    # The login throttle answers before any call (anyproxy.operator_site).
    responses["429"] = {"description": _ERRORS["429"], "content": _json(_ref("Error")),
                        "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}}
    operation = {"summary": summary, "responses": responses}
    if description:
        operation["description"] = description
    parameters = list(parameters)
    if changes:
        parameters.append(_CSRF_PARAMETER)
        for code in ("403", "413", "415", "400"):
            responses.setdefault(code, {"description": _ERRORS[code],
                                        "content": _json(_ref("Error"))})
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": False, "content": _json(body)}
    return operation


def _path_parameter(name, description):
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "minLength": 1}}


_STREAM_ID = _path_parameter("stream_id", "a stream id from GET /api/streams")
_CLIENT_ID = _path_parameter("client_id", "a connected client's id")
_CLIENT_GROUP = {"name": "group", "in": "query", "required": False,
                 "description": "only the client's tunnels of this group (clients of two "
                                "groups may have the same id); default: every group",
                 "schema": {"type": "string", "minLength": 1}}

PATHS = {
    "/api/status": {"get": _operation("Gateway, totals and connected tunnels", "200",
                                      _ref("Status"), [])},
    "/api/tunnels": {"get": _operation("Connected client tunnels", "200",
                                       _list_of("tunnels", "TunnelStatus"), [])},
    "/api/streams": {"get": _operation("Open user streams", "200",
                                       _list_of("streams", "Stream"), [])},
    "/api/streams/{stream_id}": {"delete": _operation(
        "Close one stream (RESET to the client, the user's connection closed)", "200",
        {"type": "object", "required": ["id", "closed"],
         "properties": {"id": {"type": "string"}, "closed": {"const": True}}},
        ["404"], changes=True, parameters=[_STREAM_ID])},
    "/api/users": {"get": _operation(
        "Configured proxy users: groups, policy, open streams (never a password)", "200",
        _list_of("users", "User"), [])},
    "/api/clients/{client_id}": {"delete": _operation(
        "Disconnect a client: GOAWAY and close each of its tunnels (open streams are reset)",
        "200", {"type": "object", "required": ["client_id", "tunnels"],
                "properties": {"client_id": {"type": "string"},
                               "tunnels": {"type": "integer"}}},
        ["404"], changes=True, parameters=[_CLIENT_ID, _CLIENT_GROUP],
        description="The client reconnects after its backoff unless its credential is "
                    "removed (then reload).")},
    "/api/clients/{client_id}/drain": {"post": _operation(
        "Drain a client: its tunnels take no new streams; each closes once its streams end",
        "202", {"type": "object", "required": ["client_id", "tunnels", "active_streams"],
                "properties": {"client_id": {"type": "string"}, "tunnels": {"type": "integer"},
                               "active_streams": {"type": "integer"}}},
        ["404"], changes=True, parameters=[_CLIENT_ID, _CLIENT_GROUP])},
    "/api/drain": {"post": _operation(
        "Drain the gateway: leave the fleet, stop accepting, GOAWAY to every tunnel, let "
        "open streams finish", "202",
        {"type": "object", "required": ["draining", "timeout", "active_streams"],
         "properties": {"draining": {"const": True}, "timeout": {"type": "number"},
                        "active_streams": {"type": "integer"}}},
        ["409"], changes=True,
        body={"type": "object", "additionalProperties": False,
              "properties": {"timeout": {"type": "number", "minimum": 0, "maximum": 86400,
                                         "description": "seconds; default "
                                                        "gateway.drain_timeout"}}})},
    "/api/reload": {"post": _operation(
        "Reload the config file, as SIGHUP does", "200",
        {"type": "object", "required": ["applied", "summary", "restart_needed"],
         "properties": {"applied": {"const": True}, "summary": {"type": "string"},
                        "restart_needed": {"type": "array", "items": {"type": "string"}}}},
        ["409"], changes=True)},
    "/api/config": {"get": _operation(
        "The effective config (proxy, gateway, log), every secret redacted", "200",
        {"type": "object", "required": ["path", "proxy", "gateway", "log"],
         "properties": {"path": {"type": ["string", "null"]},
                        "proxy": {"type": ["object", "null"]},
                        "gateway": {"type": ["object", "null"]},
                        "log": {"type": ["object", "null"]}}}, [])},
    "/api/openapi.json": {"get": _operation("This document", "200", {"type": "object"}, [])},
    "/api/profiles": {"get": _operation(
        "The capability URLs of /proxy.pac and /clash.yaml (a token derived from the status "
        "login, for browsers that cannot log in): with every group's routes, and for each "
        "group with a connected client, with that group's only", "200",
        {"type": "object", "required": ["pac", "clash", "groups"],
         "properties": {"pac": {"type": "string"}, "clash": {"type": "string"},
                        "groups": {"type": "object", "additionalProperties": {
                            "type": "object", "required": ["pac", "clash"],
                            "properties": {"pac": {"type": "string"},
                                           "clash": {"type": "string"}}}}}}, [])},
}


def openapi_document():
    """The OpenAPI 3.1 document, a new dict each time."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "AnyProxy gateway management API", "version": __version__,
            "description": "On gateway.status_addr, behind the status login (HTTP Basic). "
                           "See docs/MANAGEMENT_API.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"basic": []}],
        "paths": PATHS,
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "schemas": SCHEMAS,
        },
    })
