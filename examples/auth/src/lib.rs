//! A room that admits only clients with the shared token that the operator
//! set with `--var AUTH_TOKEN=<token>` or in `--env-file`.
//!
//! A WebSocket passes `?token=<token>&user=<name>`. `on-before-connect`
//! answers 401 without a token and 403 with a wrong one, before any socket
//! opens; with the right one it adds the header `x-user: <name>`, which
//! `on-connect` reads to greet the client with `welcome <name>`.
//!
//! An HTTP request passes `authorization: Bearer <token>` and `?user=<name>`,
//! and gets `hello <name>`, or the same 401 and 403.

use partyhost_sdk::{export_room, Admission, Connection, Request, Response, Room};

/// Header the room adds to an admitted request. It replaces a header of
/// the same name that the client sent, so a client cannot forge it.
const USER_HEADER: &str = "x-user";

struct Auth;

/// Checks `token` against `AUTH_TOKEN`, and admits the request as `user`.
fn admit(token: Option<&str>, user: Option<&str>) -> Admission {
    let Some(expected) = partyhost_sdk::env("AUTH_TOKEN") else {
        return Admission::reject(Response::text(500, "the room has no AUTH_TOKEN: start partyhost with --var AUTH_TOKEN=..."));
    };
    match token {
        None => Admission::reject(Response::text(401, "missing token")),
        Some(token) if token != expected => Admission::reject(Response::text(403, "invalid token")),
        Some(_) => Admission::allow_with_headers([(USER_HEADER, user.unwrap_or("anonymous"))]),
    }
}

impl Room for Auth {
    fn new() -> Self {
        Auth
    }

    fn on_before_connect(&mut self, request: &Request) -> Admission {
        admit(request.query("token"), request.query("user"))
    }

    fn on_connect(&mut self, connection: &Connection, request: &Request) {
        let user = request.header(USER_HEADER).unwrap_or("nobody");
        connection.send(format!("welcome {user}"));
    }

    fn on_before_request(&mut self, request: &Request) -> Admission {
        let token = request.header("authorization").and_then(|value| value.strip_prefix("Bearer "));
        admit(token, request.query("user"))
    }

    fn on_request(&mut self, request: Request) -> Response {
        Response::text(200, format!("hello {}", request.header(USER_HEADER).unwrap_or("nobody")))
    }
}

export_room!(Auth);
