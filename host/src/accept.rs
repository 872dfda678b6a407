//! The HTTP/1.1 accept loop: how many plain HTTP connections the server
//! serves at once, how long a client may take to send request headers, and
//! the graceful drain of those connections at shutdown.
//!
//! Upgraded WebSockets leave this loop's accounting once upgraded: the
//! rooms own them, and `--max-connections` bounds them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bounds on plain HTTP connections, before any upgrade.
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Accepts connections until `shutdown` resolves and serves each with
/// HTTP/1.1, then returns the handle that drains them.
///
/// At most `max_connections` connections are served at once; past it the
/// loop stops accepting, so further clients wait in the kernel's backlog
/// rather than in memory. A client must send each request's headers within
/// `header_timeout`, which also closes a keep-alive connection that stays
/// silent that long.
pub async fn accept_loop(
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
pub struct HttpDrain {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl HttpDrain {
    /// Lets each connection finish its request in flight, closes it, and
    /// waits until all are closed.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
