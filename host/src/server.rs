//! The HTTP and WebSocket server: PartyKit's URL scheme, request limits and
//! graceful shutdown.
//!
//! - `/parties/main/<room>`: one room, WebSocket or HTTP; the guest's
//!   response is returned as is.
//! - `/parties/router/<room>`: a sharded room. A WebSocket joins one shard;
//!   any other request is fanned out to every shard and answered with a JSON
//!   summary: 200 when every shard answered 2xx, 502 naming the others.
//! - `/healthz`: 200 while the server runs.
//!
//! Everything a client sends is checked before it reaches a guest: room and
//! connection ids, body size, the WebSocket handshake. Handshakes are
//! admitted at a bounded rate (`--connect-rate`) and within the connection
//! limits of the process and of each room; the excess is answered 503 with
//! `Retry-After` before the upgrade. Shutdown stops accepting, lets
//! in-flight requests finish, then closes every socket with 1001 after
//! `on-close` ran, all within `--shutdown-timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connection::{self, close_code, close_frame, ConnectionHandle, SocketLimits};
use crate::alarm;
use crate::guest::Services;
use crate::room::{ConnectOutcome, RoomEvent};
use crate::registry::{Rooms, RoomsError};
use crate::router;
use crate::runtime::{GuestRequest, GuestResponse, Runtime};

/// Maximum length of a connection id (`_pk`), in bytes.
pub const MAX_CONNECTION_ID_LEN: usize = 256;

/// Bytes each socket reads at once.
const SOCKET_READ_BUFFER: usize = 4096;

/// Seconds a client should wait before it retries, sent in `Retry-After`
/// when the server is at a limit.
const RETRY_AFTER_SECS: &str = "1";

struct App {
    rooms: Arc<Rooms>,
    config: Config,
    /// Orders and deduplicates router fan-outs.
    router: router::Router,
    /// Renders `/metrics`.
    metrics: PrometheusHandle,
    /// Allows one log line per second about handshakes over the rate.
    rate_rejection_log: DefaultDirectRateLimiter,
    /// False once shutdown started, so `/readyz` turns load balancers away.
    ready: AtomicBool,
    /// Open WebSockets of the process, bounded by `--max-connections`.
    connections: Arc<AtomicUsize>,
    /// Admits handshakes at `--connect-rate` with bursts of
    /// `--connect-burst`.
    handshakes: DefaultDirectRateLimiter,
}

/// One admitted WebSocket's share of `--max-connections`, returned when
/// dropped.
struct ConnectionPermit(Arc<AtomicUsize>);

impl ConnectionPermit {
    /// Takes a permit unless `max` connections are open.
    fn acquire(open: &Arc<AtomicUsize>, max: usize) -> Option<ConnectionPermit> {
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

/// Serves `listener` until `shutdown` resolves, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    admin: Option<TcpListener>,
    runtime: Arc<Runtime>,
    config: Config,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let services = Services::open(&config)?;
    let rooms = Rooms::new(runtime, config.clone(), services.clone());
    let alarm_scheduler = alarm::spawn_scheduler(services.alarms.clone(), rooms.clone());
    let limits = &config.limits;
    let quota = Quota::per_second(NonZeroU32::new(limits.connect_rate).expect("--connect-rate is at least 1"))
        .allow_burst(NonZeroU32::new(limits.connect_burst).expect("--connect-burst is at least 1"));
    let shutdown_deadline = limits.shutdown_timeout();
    let http_limits = HttpLimits {
        max_connections: limits.max_http_connections as usize,
        header_timeout: limits.header_timeout(),
    };
    let open_connections = Arc::new(AtomicUsize::new(0));
    let app = Arc::new(App {
        rooms: rooms.clone(),
        connections: open_connections.clone(),
        handshakes: RateLimiter::direct(quota),
        router: router::Router::default(),
        rate_rejection_log: RateLimiter::direct(Quota::per_second(NonZeroU32::MIN)),
        metrics,
        ready: AtomicBool::new(true),
        config,
    });
    let mut routes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/parties/{party}", any(missing_room))
        .route("/parties/{party}/", any(missing_room))
        .route("/parties/{party}/{room}", any(party))
        .route("/parties/{party}/{room}/", any(party))
        .route("/parties/{party}/{room}/{*rest}", any(party))
        .fallback(|| async {
            text(StatusCode::NOT_FOUND, "not found: rooms live at /parties/<party>/<room>")
        })
        .with_state(app.clone());
    if admin.is_none() {
        routes = routes.route("/metrics", get(render_metrics).with_state(app.clone()));
    }
    if let Some(admin) = admin {
        let admin_routes = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(render_metrics))
            .route("/parties/router/{room}", get(list_shards))
            .with_state(app.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(admin, admin_routes).await {
                tracing::error!(err = %err, "admin listener failed");
            }
        });
    }

    let (stopping_tx, stopping) = oneshot::channel::<()>();
    let accepting = tokio::spawn(accept_loop(listener, routes, http_limits, async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections");
        let _ = stopping_tx.send(());
    }));
    if stopping.await.is_err() {
        accepting.await?;
        return Ok(());
    }

    // One deadline covers every step of the shutdown.
    let deadline = tokio::time::Instant::now() + shutdown_deadline;
    app.ready.store(false, Ordering::Release);
    // Alarms that come due from now on stay persisted and fire after the
    // next start.
    alarm_scheduler.abort();
    let graceful = accepting.await?;
    let http_drained = async {
        if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
            tracing::warn!("in-flight requests did not finish before the shutdown deadline");
        }
    };
    // Upgraded sockets are not part of the HTTP drain: the rooms close them.
    let sockets_closed = async {
        rooms.shutdown(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
        let closed = async {
            while open_connections.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            tracing::warn!("some sockets did not close before the shutdown deadline");
        }
    };
    tokio::join!(http_drained, sockets_closed);
    tracing::info!("stopped");
    Ok(())
}

/// Bounds on plain HTTP connections, before any upgrade.
struct HttpLimits {
    max_connections: usize,
    header_timeout: Duration,
}

/// Accepts connections until `shutdown` resolves and serves each with
/// HTTP/1.1, then returns the handle that drains them.
///
/// At most `max_connections` connections are served at once; past it the
/// loop stops accepting, so further clients wait in the kernel's backlog
/// rather than in memory. A client must send each request's headers within
/// `header_timeout`, which also closes a keep-alive connection that stays
/// silent that long.
async fn accept_loop(
    listener: TcpListener,
    routes: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> HttpDrain {
    let drain = HttpDrain {
        stop: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);

    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        if slots.available_permits() == 0 {
            tracing::warn!(max = limits.max_connections, "HTTP connections at --max-http-connections: accepting paused");
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Out of descriptors, most likely: wait for some to free.
                    tracing::warn!(err = %err, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };

        let service = TowerToHyperService::new(routes.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stop = drain.stop.clone();
        drain.tasks.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(err = %err, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drain
}

/// The open HTTP connections, for a graceful shutdown.
struct HttpDrain {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl HttpDrain {
    /// Lets each connection finish its request in flight, closes it, and
    /// waits until all are closed.
    async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        return text(StatusCode::OK, "ready");
    }
    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
}

async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    metrics::gauge!("partyhost_rooms").set(app.rooms.len() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// One shard in the admin listing of a logical room.
#[derive(serde::Serialize)]
struct ShardLoad {
    room: String,
    running: bool,
    connections: usize,
}

/// Lists the shards of a logical room with their connection counts (admin
/// listener only).
async fn list_shards(State(app): State<Arc<App>>, Path(room): Path<String>) -> Response {
    if let Err(message) = router::validate_room_id(&room) {
        return text(StatusCode::BAD_REQUEST, message);
    }
    let shards: Vec<ShardLoad> = (1..=app.config.shards_for(&room))
        .map(|k| {
            let id = router::shard_id(&room, k);
            let handle = app.rooms.find(&id);
            ShardLoad {
                running: handle.is_some(),
                connections: handle.map_or(0, |h| h.stats.connections.load(Ordering::Relaxed)),
                room: id,
            }
        })
        .collect();
    let body = serde_json::json!({ "room": room, "balance": format!("{:?}", app.config.balance), "shards": shards });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Handles `/parties/<party>` without a room id.
async fn missing_room() -> Response {
    text(StatusCode::BAD_REQUEST, "room id is empty: use /parties/<party>/<room>")
}

/// Handles `/parties/<party>/<room>[/...]`.
async fn party(
    State(app): State<Arc<App>>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> Response {
    let party = params.get("party").map(String::as_str).unwrap_or_default();
    let room = params.get("room").map(String::as_str).unwrap_or_default();
    if party != "main" && party != "router" {
        return text(
            StatusCode::NOT_FOUND,
            format!("unknown party `{}`: use `main` for one room or `router` for a sharded room", party.escape_debug()),
        );
    }
    if let Err(message) = router::validate_room_id(room) {
        return text(StatusCode::BAD_REQUEST, message);
    }
    if party == "router" {
        if let Err(message) = router::validate_logical_room_id(room) {
            return text(StatusCode::BAD_REQUEST, message);
        }
    }

    if is_websocket_upgrade(request.headers()) {
        let shard_of = (party == "router").then(|| room.to_string());
        return connect(app, shard_of, room.to_string(), request).await;
    }

    let request = match read_request(&app, request).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    if party == "router" {
        return fan_out(&app, room, request).await;
    }
    match app.rooms.request(room, request, 1).await.result {
        Ok(response) => guest_response(room, response),
        Err(err) => {
            tracing::warn!(room = %room, err = %err, "request failed");
            let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = text(status, err.to_string());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            response
        }
    }
}

async fn fan_out(app: &App, room: &str, request: GuestRequest) -> Response {
    let key = request
        .headers
        .iter()
        .find(|(name, _)| name == "idempotency-key")
        .map(|(_, value)| value.clone());
    if let Some(key) = &key {
        let valid = !key.is_empty()
            && key.len() <= router::MAX_IDEMPOTENCY_KEY_LEN
            && key.bytes().all(|byte| byte.is_ascii_graphic() || byte == b' ');
        if !valid {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "Idempotency-Key must be 1 to {} printable ASCII characters",
                    router::MAX_IDEMPOTENCY_KEY_LEN
                ),
            );
        }
    }
    let summary = app.router.fan_out(&app.rooms, room, request, key).await;
    let status = if summary.failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = serde_json::to_vec(&summary).expect("fan-out summary serialises");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Accepts a WebSocket for room `room`, or for a shard of logical room
/// `shard_of`, and hands it to the room.
async fn connect(app: Arc<App>, shard_of: Option<String>, room: String, request: Request) -> Response {
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
    if app.handshakes.check().is_err() {
        crate::metrics::rejected_connection("connect_rate");
        if app.rate_rejection_log.check().is_ok() {
            tracing::warn!(room = %room_id, rate = app.config.limits.connect_rate,
                "handshakes rejected: over --connect-rate (logged at most once per second)");
        }
        return unavailable_text(format!(
            "too many connection attempts: the server admits {} per second (--connect-rate); retry",
            app.config.limits.connect_rate
        ));
    }
    let max_connections = app.config.limits.max_connections;
    let Some(permit) = ConnectionPermit::acquire(&app.connections, max_connections) else {
        crate::metrics::rejected_connection("max_connections");
        tracing::warn!(room = %room_id, max_connections, "handshake rejected: server at --max-connections");
        return unavailable_text(format!(
            "the server has its maximum of {max_connections} connections open (--max-connections)"
        ));
    };
    let room = match app.rooms.get(&room_id) {
        Ok(room) => room,
        Err(err @ RoomsError::Full(_)) => {
            crate::metrics::rejected_connection("max_rooms");
            // The room pool is full: the client gets the WebSocket close code
            // for "try again later", which reconnecting clients act on.
            tracing::warn!(room = %room_id, err = %err, "connection rejected");
            let reason = err.to_string();
            return upgrade.on_upgrade(move |mut socket| async move {
                reject(&mut socket, close_code::TRY_AGAIN_LATER, &reason).await;
            });
        }
        Err(err) => return unavailable(&err),
    };
    let per_room = app.config.limits.max_connections_per_room;
    if room.stats.connections.load(Ordering::Relaxed) >= per_room {
        crate::metrics::rejected_connection("max_connections_per_room");
        tracing::warn!(room = %room_id, max = per_room, "handshake rejected: room at --max-connections-per-room");
        return unavailable_text(format!(
            "room `{room_id}` has its maximum of {per_room} connections open (--max-connections-per-room)"
        ));
    }

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
                    tracing::info!(room = %room_id, conn = %handle.id, code = rejection.code,
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

/// Reads a request body within `--max-body-bytes` and converts the request
/// for the guest.
async fn read_request(app: &App, request: Request) -> Result<GuestRequest, Response> {
    let max = app.config.limits.max_body_bytes;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {max} bytes (--max-body-bytes)"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }

    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, max).await {
        Ok(body) => body,
        Err(err) => {
            let is_limit = std::error::Error::source(&err)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if is_limit {
                return Err(too_large());
            }
            return Err(text(StatusCode::BAD_REQUEST, format!("failed to read the request body: {err}")));
        }
    };
    // Headers named x-partyhost-* come from the host only.
    let mut headers = guest_headers(&parts.headers);
    headers.retain(|(name, _)| !name.starts_with("x-partyhost-"));
    Ok(GuestRequest {
        method: parts.method.to_string(),
        url: original_url(&parts.uri),
        headers,
        body: body.to_vec(),
    })
}

/// Converts a guest's response, dropping headers that are not valid HTTP.
fn guest_response(room: &str, response: GuestResponse) -> Response {
    // 1xx answers belong to the protocol (101 is the WebSocket upgrade), and
    // codes past 599 are not HTTP.
    let status = StatusCode::from_u16(response.status).ok().filter(|_| (200..=599).contains(&response.status));
    let Some(status) = status else {
        tracing::warn!(room = %room, status = response.status, "guest answered an invalid HTTP status");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("room answered invalid status {}: use 200 to 599", response.status),
        );
    };
    let mut builder = Response::builder().status(status);
    for (name, value) in response.headers {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) else {
            tracing::warn!(room = %room, header = %name.escape_debug(), "guest response header is invalid: dropped");
            continue;
        };
        // The host frames the body and manages the connection; a room's
        // own framing headers would desynchronise the client.
        if is_framing_header(&name) {
            tracing::warn!(room = %room, header = %name, "guest response header is set by the host: dropped");
            continue;
        }
        builder = builder.header(name, value);
    }
    builder.body(Body::from(response.body)).unwrap_or_else(|err| {
        text(StatusCode::INTERNAL_SERVER_ERROR, format!("room answered an invalid response: {err}"))
    })
}

/// Headers that describe the connection or the body's framing, which only
/// the host may set.
fn is_framing_header(name: &HeaderName) -> bool {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ]
    .contains(name)
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// The connection id: the `_pk` query parameter, or a new UUID.
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

fn original_url(uri: &axum::http::Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string())
}

fn guest_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect()
}

fn unavailable(err: &RoomsError) -> Response {
    unavailable_text(err.to_string())
}

/// A 503 that tells the client when to retry.
fn unavailable_text(message: String) -> Response {
    let mut response = text(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}
