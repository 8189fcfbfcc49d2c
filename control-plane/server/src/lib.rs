//! The kvmesh control plane: a replica registry fed by the `kvmesh.v1`
//! ReplicaState stream, aggregated into Envoy resources (LDS/RDS/CDS/EDS, the
//! routing filter by ECDS) and live state (PoolState, ResidencyShard) served
//! by ADS; strategy hot-swap with ACK/NACK reporting; admin API and metrics.

pub mod admin;
pub mod app;
pub mod config;
pub mod envoy;
pub mod kube_pools;
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
/// `on_bound` runs once both listeners are bound. With a `kubernetes` source in the config,
/// the cluster is found as kubectl would (in-cluster service account, or `KUBECONFIG`).
pub async fn serve(config: Config, on_bound: impl FnOnce(Bound)) -> anyhow::Result<()> {
    let kube = match &config.kubernetes {
        Some(_) => Some(kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!(
                "the config has a kubernetes source but no cluster was found \
                 (in-cluster service account or KUBECONFIG): {e}"
            )
        })?),
        None => None,
    };
    serve_with(config, kube, |bound, _| on_bound(bound)).await
}

/// As [`serve`], with the Kubernetes client given (`None`: pools from Kubernetes come only
/// through [`App::set_dynamic_pools`], as in-process tests feed them), and `on_bound` handed
/// the running [`App`].
pub async fn serve_with(
    config: Config,
    kube: Option<kube::Client>,
    on_bound: impl FnOnce(Bound, Arc<App>),
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let app = App::new(config.clone()).await?;
    if let (Some(client), Some(k)) = (kube, &config.kubernetes) {
        tokio::spawn(kube_pools::run(app.clone(), client, k.clone()));
    }
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
    on_bound(bound, app.clone());
    tokio::select! {
        r = grpc_server => r?,
        r = admin_server => r?,
    }
    Ok(())
}
