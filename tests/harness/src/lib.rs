//! Test support for kvmesh: starts real Envoy processes on ephemeral loopback
//! ports, serves in-process upstreams that record what reached them, reads
//! Envoy's stats, and runs the whole stack (control plane, model-server
//! replicas, Envoy) on one machine ([`stack`]). Readiness is polled with
//! deadlines; nothing sleeps and hopes.

mod envoy;
mod gateway;
pub mod load;
pub mod stack;
mod upstream;

pub use envoy::{Envoy, envoy_bin, plugin_path, workspace_root};
pub use gateway::StaticGateway;
pub use upstream::{Behaviour, Seen, Upstream};

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM: what the launchers select on, so
/// that they stop their processes instead of dying and leaving them running.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// An HTTP client that opens a new connection per request (so successive
/// requests land on any Envoy worker, as separate clients' would).
pub fn fresh_connection_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"))
}
