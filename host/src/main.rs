//! The `partyhost` command: parses options, loads the room component and
//! serves until SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use partyhost::config::{Config, LogFormat};
use partyhost::runtime::Runtime;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(config.log_format);

    let tokio = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(tokio) => tokio,
        Err(err) => {
            tracing::error!(err = %err, "failed to start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match tokio.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let runtime = load_room(&config)?;
    let services = partyhost::guest::Services::open(&config)?;
    let metrics = partyhost::metrics::install()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let addr = listener.local_addr().context("failed to read the listening address")?;
    let admin = match config.admin_listen {
        Some(admin_addr) => {
            let admin = tokio::net::TcpListener::bind(admin_addr)
                .await
                .with_context(|| format!("failed to listen on {admin_addr} (--admin-listen)"))?;
            let admin_addr = admin.local_addr().context("failed to read the admin address")?;
            tracing::info!(addr = %admin_addr, "admin listening on http://{admin_addr}");
            Some(admin)
        }
        None => None,
    };
    tracing::info!(
        module = %runtime.source,
        compile_ms = runtime.compile_time.as_millis() as u64,
        shards = config.shards,
        addr = %addr,
        "partyhost listening on http://{addr}"
    );
    partyhost::server::serve(listener, admin, runtime, config, services, metrics, shutdown_signal()).await
}

fn load_room(config: &Config) -> anyhow::Result<Arc<Runtime>> {
    match &config.module {
        Some(path) => Runtime::from_file(path, &config.limits),
        None => Runtime::new("built-in default room", partyhost::DEFAULT_ROOM_WASM, &config.limits),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::warn!(err = %err, "failed to listen for SIGTERM; only SIGINT stops the server");
            let _ = interrupt.await;
            return;
        }
    };
    tokio::select! {
        _ = interrupt => tracing::info!("received SIGINT"),
        _ = terminate.recv() => tracing::info!("received SIGTERM"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
