//! The WebSocket handshake: admission of a new socket and its hand-over to a
//! room.
//!
//! Before the upgrade, a handshake is checked against `--connect-rate`, the
//! connection limits of the process and of the room, and the room's
//! `on-before-connect` and `on-connect`, so a client whose socket opens is
//! already in the room. The excess is answered 503 with `Retry-After`, a
//! room pool that is full closes the socket with 1013, and a room that
//! fails in `on-connect` closes it with the code the room's failure maps to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use tokio::sync::oneshot;

use crate::connection::{self, close_code, close_frame, ConnectionHandle, SocketLimits};
use crate::registry::RoomsError;
use crate::config::Limits;
use crate::room::{ConnectOutcome, Rejection, RoomEvent, RoomHandle};
use crate::router;
use crate::runtime::GuestRequest;
use crate::server::{guest_headers, guest_response, original_url, text, unavailable, unavailable_text, App};

/// Maximum length of a connection id (`_pk`), in bytes.
pub const MAX_CONNECTION_ID_LEN: usize = 256;

/// Bytes each socket reads at once.
const SOCKET_READ_BUFFER: usize = 4096;

/// One admitted WebSocket's share of `--max-connections`, returned when
/// dropped.
pub(crate) struct ConnectionPermit(Arc<AtomicUsize>);

impl ConnectionPermit {
    /// Takes a permit unless `max` connections are open.
    pub(crate) fn acquire(open: &Arc<AtomicUsize>, max: usize) -> Option<ConnectionPermit> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| (count < max).then_some(count + 1))
            .ok()
            .map(|_| ConnectionPermit(open.clone()))
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts a WebSocket for room `room`, or for a shard of logical room
/// `shard_of`, and hands it to the room.
pub(crate) async fn connect(app: Arc<App>, shard_of: Option<String>, room: String, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let url = original_url(&parts.uri);
    let conn_id = match connection_id(parts.uri.query()) {
        Ok(id) => id,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let room_id = match shard_of {
        Some(logical) => router::shard_id(&logical, app.rooms.pick_shard(&logical, &conn_id)),
        None => room,
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let reason = rejection.body_text();
            return text(StatusCode::BAD_REQUEST, format!("invalid WebSocket handshake: {reason}"));
        }
    };
    let (permit, room) = match admit(&app, &room_id) {
        Ok(admitted) => admitted,
        Err(Refusal::Answer(response)) => return response,
        Err(Refusal::Close(reason)) => {
            // The room pool is full: the client gets the WebSocket close code
            // for "try again later", which reconnecting clients act on.
            return upgrade.on_upgrade(move |mut socket| async move {
                reject(&mut socket, close_code::TRY_AGAIN_LATER, &reason).await;
            });
        }
    };

    let guest_request = GuestRequest {
        method: parts.method.to_string(),
        url,
        headers: guest_headers(&parts.headers),
        body: Vec::new(),
    };
    let limits = app.config.limits.clone();
    let room_id: Arc<str> = room_id.into();
    let handle = ConnectionHandle::new(conn_id.into(), room_id.clone(), limits.max_outbound_bytes);

    // `on-connect` runs before the handshake completes, so a client that
    // sees its socket open is already in the room and gets every later
    // broadcast. What it sends meanwhile waits in the outbound queue.
    let (reply, accepted) = oneshot::channel();
    let event = RoomEvent::Connect {
        handle: handle.clone(),
        request: guest_request,
        reply,
    };
    room.stats.joining.fetch_add(1, Ordering::Relaxed);
    if !room.notify(event).await {
        room.stats.joining.fetch_sub(1, Ordering::Relaxed);
        return unavailable(&RoomsError::ShuttingDown);
    }
    let outcome = match accepted.await {
        Ok(ConnectOutcome::Accepted) => Ok(()),
        Ok(ConnectOutcome::Rejected(rejection)) => Err(rejection),
        // on-before-connect's answer replaces the upgrade.
        Ok(ConnectOutcome::Refused(response)) => return guest_response(&room_id, response),
        Err(_) => return unavailable(&RoomsError::ShuttingDown),
    };
    complete_upgrade(upgrade, &limits, room, handle, permit, outcome)
}

/// Reason a handshake was not admitted.
enum Refusal {
    /// Answer the handshake with this HTTP response.
    Answer(Response),
    /// Complete the upgrade, then close the socket with 1013 and this reason.
    Close(String),
}

/// Admits a handshake for room `room_id` within the rate and the connection
/// and room limits; returns the connection's permit and the room.
fn admit(app: &App, room_id: &str) -> Result<(ConnectionPermit, RoomHandle), Refusal> {
    if app.handshakes.check().is_err() {
        crate::metrics::rejected_connection("connect_rate");
        if app.rate_rejection_log.check().is_ok() {
            tracing::warn!(room = %room_id, rate = app.config.limits.connect_rate,
                "handshakes rejected: over --connect-rate (logged at most once per second)");
        }
        return Err(Refusal::Answer(unavailable_text(format!(
            "too many connection attempts: the server admits {} per second (--connect-rate); retry",
            app.config.limits.connect_rate
        ))));
    }
    let max_connections = app.config.limits.max_connections;
    let Some(permit) = ConnectionPermit::acquire(&app.connections, max_connections) else {
        crate::metrics::rejected_connection("max_connections");
        tracing::warn!(room = %room_id, max_connections, "handshake rejected: server at --max-connections");
        return Err(Refusal::Answer(unavailable_text(format!(
            "the server has its maximum of {max_connections} connections open (--max-connections)"
        ))));
    };
    let room = match app.rooms.get(room_id) {
        Ok(room) => room,
        Err(err @ RoomsError::Full(_)) => {
            crate::metrics::rejected_connection("max_rooms");
            tracing::warn!(room = %room_id, err = %err, "connection rejected");
            return Err(Refusal::Close(err.to_string()));
        }
        Err(err) => return Err(Refusal::Answer(unavailable(&err))),
    };
    let per_room = app.config.limits.max_connections_per_room;
    if room.stats.connections.load(Ordering::Relaxed) >= per_room {
        crate::metrics::rejected_connection("max_connections_per_room");
        tracing::warn!(room = %room_id, max = per_room, "handshake rejected: room at --max-connections-per-room");
        return Err(Refusal::Answer(unavailable_text(format!(
            "room `{room_id}` has its maximum of {per_room} connections open (--max-connections-per-room)"
        ))));
    }
    Ok((permit, room))
}

/// Completes the upgrade of a connection the room accepted, or closes the
/// socket with the code of the room's `rejection`.
fn complete_upgrade(
    upgrade: WebSocketUpgrade,
    limits: &Limits,
    room: RoomHandle,
    handle: ConnectionHandle,
    permit: ConnectionPermit,
    outcome: Result<(), Rejection>,
) -> Response {
    let limits = limits.clone();
    let failed_room = room.clone();
    let failed_handle = handle.clone();
    upgrade
        .max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        // tungstenite reserves its read buffer up front, 128 KiB by
        // default, which would dominate the memory of an idle socket.
        .read_buffer_size(SOCKET_READ_BUFFER)
        .on_failed_upgrade(move |err| {
            tracing::warn!(room = %failed_room.id, conn = %failed_handle.id, err = %err, "WebSocket upgrade failed");
            tokio::spawn(async move {
                let event = RoomEvent::Close {
                    conn: failed_handle.id.clone(),
                    serial: failed_handle.serial,
                    code: close_code::ABNORMAL,
                    reason: "WebSocket upgrade failed".into(),
                };
                failed_room.notify(event).await;
            });
        })
        .on_upgrade(move |mut socket| async move {
            let _permit = permit;
            match outcome {
                Ok(()) => {
                    let socket_limits = SocketLimits {
                        ping_interval: limits.ping_interval(),
                    };
                    connection::serve(socket, handle, room, socket_limits).await;
                }
                Err(rejection) => {
                    // A guest that failed in on-connect gets the socket
                    // closed with a code, which WebSocket clients report
                    // better than a failed handshake.
                    tracing::info!(room = %room.id, conn = %handle.id, code = rejection.code,
                        reason = %rejection.reason, "connection rejected");
                    reject(&mut socket, rejection.code, &rejection.reason).await;
                }
            }
        })
}

async fn reject(socket: &mut WebSocket, code: u16, reason: &str) {
    let reason = crate::guest::truncate(reason, 123);
    let _ = socket.send(Message::Close(Some(close_frame(code, reason)))).await;
}

pub(crate) fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// Returns the connection id: the `_pk` query parameter, or a new UUID.
fn connection_id(query: Option<&str>) -> Result<String, String> {
    let raw = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "_pk")
        .map(|(_, value)| value);
    let Some(raw) = raw else {
        return Ok(uuid::Uuid::new_v4().to_string());
    };
    // Decoded strictly: a lossy decoding would map different invalid ids to
    // the same one, and let one client replace another's connection.
    let plus_as_space = raw.replace('+', " ");
    let pk = percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8()
        .map_err(|_| "connection id `_pk` is not valid UTF-8 once percent-decoded".to_string())?;
    if pk.is_empty() || pk.len() > MAX_CONNECTION_ID_LEN {
        return Err(format!(
            "connection id `_pk` must be 1 to {MAX_CONNECTION_ID_LEN} bytes long, not {}",
            pk.len()
        ));
    }
    if pk.chars().any(char::is_control) {
        return Err("connection id `_pk` contains control characters".into());
    }
    Ok(pk.into_owned())
}
