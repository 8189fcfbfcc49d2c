//! The kvmesh control plane: a replica registry fed by the `kvmesh.v1`
//! ReplicaState stream, aggregated into Envoy resources (LDS/RDS/CDS/EDS, the
//! routing filter by ECDS) and live state (PoolState, ResidencyShard) served
//! by ADS; strategy hot-swap with ACK/NACK reporting; admin API and metrics.

pub mod admin;
pub mod app;
pub mod config;
pub mod envoy;
pub mod metrics;
pub mod registry;
pub mod report_stream;
pub mod shard_body;
pub mod strategy;

use std::net::SocketAddr;
use std::sync::Arc;

use kvmesh_control_plane_xds::XdsServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use app::App;
pub use config::Config;

/// Addresses actually bound (ports may have been 0 in the config).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

/// Binds the gRPC and admin listeners, then serves until the process ends.
/// `on_bound` runs once both listeners are bound.
pub async fn serve(config: Config, on_bound: impl FnOnce(Bound)) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let app = App::new(config.clone()).await?;
    let grpc = TcpListener::bind(config.grpc).await?;
    let admin = TcpListener::bind(config.admin).await?;
    let bound = Bound {
        grpc: grpc.local_addr()?,
        admin: admin.local_addr()?,
    };
    if admin::token(&app).is_none() {
        tracing::warn!(
            "no admin token configured: strategy changes through the admin API are refused"
        );
    }
    let xds = XdsServer::new(app.cache.clone(), app.status.clone())
        .with_observer(Arc::new(metrics::XdsObserver(app.metrics.clone())));
    let state = report_stream::ReportService {
        app: app.clone(),
        max_message_bytes: 64 << 20,
    };
    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(xds.into_service())
        .add_service(state)
        .serve_with_incoming(TcpListenerStream::new(grpc));
    let admin_server = axum::serve(admin, admin::router(app.clone()));
    tokio::spawn(app.clone().run_publisher());
    on_bound(bound);
    tokio::select! {
        r = grpc_server => r?,
        r = admin_server => r?,
    }
    Ok(())
}
