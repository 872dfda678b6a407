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
//! Everything a client sends is checked before it reaches a guest: room ids,
//! body size and, in [`crate::handshake`], the WebSocket handshake. A room's
//! response loses the headers that frame the body, which the host sets.
//! Shutdown stops accepting, lets in-flight requests finish, then closes
//! every socket with 1001 after `on-close` ran, all within
//! `--shutdown-timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::accept::{accept_loop, HttpLimits};
use crate::config::Config;
use crate::handshake;
use crate::alarm;
use crate::guest::Services;
use crate::registry::{Rooms, RoomsError};
use crate::router;
use crate::runtime::{GuestRequest, GuestResponse, Runtime};

/// Seconds a client should wait before it retries, sent in `Retry-After`
/// when the server is at a limit.
const RETRY_AFTER_SECS: &str = "1";

pub(crate) struct App {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) config: Config,
    /// Orders and deduplicates router fan-outs.
    pub(crate) router: router::Router,
    /// Renders `/metrics`.
    pub(crate) metrics: PrometheusHandle,
    /// Allows one log line per second about handshakes over the rate.
    pub(crate) rate_rejection_log: DefaultDirectRateLimiter,
    /// False once shutdown started, so `/readyz` turns load balancers away.
    pub(crate) ready: AtomicBool,
    /// Open WebSockets of the process, bounded by `--max-connections`.
    pub(crate) connections: Arc<AtomicUsize>,
    /// Admits handshakes at `--connect-rate` with bursts of
    /// `--connect-burst`.
    pub(crate) handshakes: DefaultDirectRateLimiter,
}

/// Serves `listener` until `shutdown` resolves, then shuts down gracefully.
/// `services` come from [`Services::open`], which the caller runs first so
/// that a bad data directory or environment fails before the server
/// listens.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    admin: Option<TcpListener>,
    runtime: Arc<Runtime>,
    config: Config,
    services: Services,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
        router: router::Router::new(config.limits.max_fanout_bytes),
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

    if handshake::is_websocket_upgrade(request.headers()) {
        let shard_of = (party == "router").then(|| room.to_string());
        return handshake::connect(app, shard_of, room.to_string(), request).await;
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
    let summary = match app.router.fan_out(&app.rooms, room, request, key.clone()).await {
        Ok(summary) => summary,
        Err(router::FanOutError::TooLarge { bytes, max }) => {
            tracing::info!(room = %room, bytes, max, "fan-out rejected: body times shards over --max-fanout-bytes");
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body, copied to each shard, takes {bytes} bytes: the limit is {max} (--max-fanout-bytes)"
                ),
            );
        }
        Err(router::FanOutError::Busy) => {
            tracing::warn!(room = %room, "fan-out rejected: --max-fanout-bytes in flight for the whole call timeout");
            return unavailable_text("too many fan-outs in flight (--max-fanout-bytes); retry".into());
        }
        Err(router::FanOutError::KeyReused) => {
            let key = key.unwrap_or_default();
            tracing::info!(room = %room, key = %key, "Idempotency-Key reused for a different request");
            return text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Idempotency-Key `{key}` was used for a different request (method or body) within \
                     --idempotency-window; use a new key for a new request"
                ),
            );
        }
    };
    let status = if summary.failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = serde_json::to_vec(&summary).expect("fan-out summary serialises");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
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
pub(crate) fn guest_response(room: &str, response: GuestResponse) -> Response {
    // 1xx answers belong to the protocol (101 is the WebSocket upgrade), and
    // codes past 599 are not HTTP.
    let status = StatusCode::from_u16(response.status).ok().filter(|_| (200..=599).contains(&response.status));
    let Some(status) = status else {
        tracing::warn!(room = %room, status = response.status, "guest returned an invalid HTTP status");
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
    // A 204 or 304 response has no body, and so no length either.
    let body = if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        Body::empty()
    } else {
        Body::from(response.body)
    };
    builder.body(body).unwrap_or_else(|err| {
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

pub(crate) fn original_url(uri: &axum::http::Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string())
}

pub(crate) fn guest_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect()
}

pub(crate) fn unavailable(err: &RoomsError) -> Response {
    unavailable_text(err.to_string())
}

/// Returns a 503 with `Retry-After`, so the client knows when to retry.
pub(crate) fn unavailable_text(message: String) -> Response {
    let mut response = text(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    response
}

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}
