//! The running control plane: registry, strategies and xDS cache tied
//! together; the publisher that turns them into snapshots; the ReplicaState
//! report handling (framed by `report_stream`); strategy changes that wait for Envoy's answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvmesh_control_plane_xds::resource::Snapshot;
use kvmesh_control_plane_xds::{
    Outcome, Resource, SnapshotCache, StatusTracker, TypeResources, type_url,
};
use kvmesh_plugins_sdk::proto::{
    ControlMessage, PoolState, Registered, Rejected, ReplicaReport, ResyncRequest, control_message,
    replica_report,
};
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::config::{Config, PoolSpec, StrategySpec, check_pools};
use crate::envoy;
use crate::metrics::{KindLabel, Metrics, OutcomeLabel, ReplicaLabel};
use crate::registry::{Applied, Registry};
use crate::strategy::{Active, Strategies, StrategyError};

/// Shared state of the control plane.
#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub registry: Mutex<Registry>,
    pub strategies: Mutex<Strategies>,
    pub cache: Arc<SnapshotCache>,
    pub status: Arc<StatusTracker>,
    pub metrics: Arc<Metrics>,
    started: Instant,
    /// Serializes strategy changes (each waits for Envoy's answer).
    change: Mutex<()>,
    publisher: Mutex<PublishState>,
    /// Oldest report not yet published (for the lag metric).
    pending_since: std::sync::Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct PublishState {
    registry_generation: u64,
    strategy_generation: u64,
    pools_generation: u64,
    warm: bool,
    /// Static resources (LDS/RDS/CDS/ECDS), rebuilt when strategies change.
    statics: BTreeMap<&'static str, Arc<TypeResources>>,
    /// The ResidencyShard set, rebuilt only when residency changed (load
    /// reports, the usual change, leave it as it is).
    residency_generation: u64,
    residency: Option<Arc<TypeResources>>,
}

/// What a strategy change came to.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PushResult {
    /// Every connected Envoy applied it.
    Acked,
    /// At least one Envoy refused it; the previous strategy keeps serving.
    Nacked,
    /// Not every Envoy answered in time (or none is connected); it stays set.
    Pending,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub pool: String,
    pub result: PushResult,
    pub strategy: Option<String>,
    pub sha256: Option<String>,
    /// ECDS resource version pushed.
    pub version: String,
    pub acked: Vec<String>,
    pub nacked: Vec<(String, String)>,
    pub pending: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    #[error("unknown pool {0}")]
    UnknownPool(String),
}

/// The JSON plugin configuration of a pool's routing filter (the filter's
/// `FilterConfig`: pool, strategy parameters, chunk size, body limit). Which
/// strategy runs is the module itself.
pub fn filter_configuration(pool: &PoolSpec, active: &Active) -> String {
    serde_json::json!({
        "pool": pool.name,
        "strategy": active.spec.params,
        "chunk_bytes": pool.chunk_bytes,
        "max_body_bytes": pool.max_body_bytes,
    })
    .to_string()
}

impl App {
    /// The pool named `name` among those served now.
    async fn pool(&self, name: &str) -> Result<PoolSpec, ChangeError> {
        self.registry
            .lock()
            .await
            .pool(name)
            .cloned()
            .ok_or_else(|| ChangeError::UnknownPool(name.into()))
    }

    /// Serves `dynamic` (the pools from Kubernetes) beside the file's pools, replacing the
    /// previous set: a pool's listener route, cluster, endpoints and routing filter appear,
    /// change or go, and its strategy follows its resource. Pools that break a rule of
    /// [`check_pools`] together with the others are left out, each with a warning (two
    /// resources naming one model: the first by name wins). Returns the names left out.
    pub async fn set_dynamic_pools(&self, dynamic: Vec<PoolSpec>) -> Vec<String> {
        let _one_at_a_time = self.change.lock().await;
        let mut served = self.config.pools.clone();
        let mut left_out = Vec::new();
        for pool in dynamic {
            served.push(pool);
            if let Err(why) = check_pools(&served) {
                let pool = served.pop().expect("just pushed");
                tracing::warn!(pool = %pool.name, %why, "pool from Kubernetes not served");
                left_out.push(pool.name);
            }
        }
        let statics = &self.config.pools;
        let served = Arc::new(served);
        {
            // Both changed under the strategies lock (taken before the registry's, as
            // `publish` does), so no publish sees new strategies with old pools or the reverse.
            let mut strategies = self.strategies.lock().await;
            let dynamic = &served[statics.len()..];
            strategies
                .sync_dynamic(dynamic, |name| statics.iter().any(|p| p.name == name))
                .await;
            self.registry.lock().await.set_pools(served.clone());
        }
        self.publish(true).await;
        left_out
    }

    pub async fn new(config: Arc<Config>) -> Result<Arc<Self>, StrategyError> {
        let strategies = Strategies::open(&config.module_store, &config.pools).await?;
        Ok(Arc::new(Self {
            registry: Mutex::new(Registry::new(config.clone())),
            strategies: Mutex::new(strategies),
            cache: Arc::new(SnapshotCache::new()),
            status: Arc::new(StatusTracker::default()),
            metrics: Arc::new(Metrics::default()),
            started: Instant::now(),
            change: Mutex::new(()),
            publisher: Mutex::new(PublishState::default()),
            pending_since: std::sync::Mutex::new(None),
            config,
        }))
    }

    pub fn is_warm(&self) -> bool {
        self.started.elapsed() >= Duration::from_millis(self.config.warmup_ms)
    }

    fn note_pending(&self) {
        let mut p = self.pending_since.lock().unwrap_or_else(|e| e.into_inner());
        p.get_or_insert_with(Instant::now);
    }

    fn statics(
        &self,
        strategies: &Strategies,
        pools: &[PoolSpec],
    ) -> BTreeMap<&'static str, Arc<TypeResources>> {
        let mut listeners = Vec::new();
        let mut routes = Vec::new();
        let mut clusters = Vec::new();
        let mut filters = Vec::new();
        let mut gateway = Vec::new();
        for pool in pools {
            let active = strategies.current(&pool.name);
            if pool.gateway.is_some() {
                gateway.push((pool, active.is_some()));
            } else {
                listeners.push(envoy::listener(pool, active.is_some()));
                routes.push(envoy::route(pool));
            }
            clusters.push(envoy::cluster(pool));
            if let Some(a) = active {
                filters.push(envoy::routing_filter(
                    &pool.name,
                    &a.path.to_string_lossy(),
                    &filter_configuration(pool, a),
                ));
            }
        }
        // The gateway of the pools from Kubernetes is served even with none of them yet:
        // its port answers 404 rather than refusing connections.
        if let Some(k) = &self.config.kubernetes {
            listeners.push(envoy::gateway_listener(k, &gateway));
            routes.push(envoy::gateway_route(&gateway));
        }
        BTreeMap::from([
            (type_url::LISTENER, Arc::new(TypeResources::new(listeners))),
            (type_url::ROUTE, Arc::new(TypeResources::new(routes))),
            (type_url::CLUSTER, Arc::new(TypeResources::new(clusters))),
            (
                type_url::EXTENSION_CONFIG,
                Arc::new(TypeResources::new(filters)),
            ),
        ])
    }

    /// Builds and sets the snapshot if anything changed since the last one.
    /// Nothing is served before the warm-up ends: after a restart, Envoy
    /// keeps its config until the replicas have re-registered.
    pub async fn publish(&self, force: bool) {
        if !self.is_warm() {
            return;
        }
        let mut p = self.publisher.lock().await;
        let strategies = self.strategies.lock().await;
        let mut registry = self.registry.lock().await;
        let expired = registry.expire(Instant::now(), self.config.silence());
        for id in &expired {
            tracing::info!(replica = %id, "replica silent too long; dropped");
        }
        let changed = !p.warm
            || force
            || p.registry_generation != registry.generation
            || p.strategy_generation != strategies.generation;
        if !changed {
            return;
        }
        let served = registry.pools();
        if !p.warm
            || p.strategy_generation != strategies.generation
            || p.pools_generation != registry.pools_generation
        {
            p.statics = self.statics(&strategies, &served);
            p.strategy_generation = strategies.generation;
            p.pools_generation = registry.pools_generation;
        }
        drop(strategies);
        p.warm = true;
        p.registry_generation = registry.generation;

        let mut snapshot = Snapshot::new();
        for (t, r) in &p.statics {
            snapshot.set_type(t, r.clone());
        }
        let mut eds = Vec::new();
        let mut pools = Vec::new();
        self.metrics.replicas.clear();
        for pool in served.iter() {
            let members = registry.members(&pool.name);
            // Registered replicas, and for a pool from Kubernetes its ready endpoints too
            // (a worker that never registers, such as another engine's, still serves).
            let mut addrs: Vec<SocketAddr> = members.iter().map(|r| r.address).collect();
            if let Some(g) = &pool.gateway {
                addrs.extend(&g.discovered);
            }
            addrs.sort();
            addrs.dedup();
            eds.push(envoy::endpoints(&pool.name, &addrs));
            let connected = members.iter().filter(|r| r.connected()).count() as i64;
            let label = |state: &str| ReplicaLabel {
                pool: pool.name.clone(),
                state: state.into(),
            };
            self.metrics
                .replicas
                .get_or_create(&label("connected"))
                .set(connected);
            self.metrics
                .replicas
                .get_or_create(&label("disconnected"))
                .set(members.len() as i64 - connected);
            let state = PoolState {
                pool: pool.name.clone(),
                model: pool.model.clone(),
                chunk_bytes: pool.chunk_bytes,
                replicas: members.iter().map(|r| r.info()).collect(),
            };
            pools.push(Resource::from_message(
                pool.name.clone(),
                type_url::POOL_STATE,
                &state,
            ));
        }
        let residency = match &p.residency {
            Some(set) if p.residency_generation == registry.residency_generation => set.clone(),
            _ => {
                let mut shards: BTreeMap<String, Arc<Resource>> = BTreeMap::new();
                for r in registry.replicas_mut() {
                    for res in r.shard_resources() {
                        shards.insert(res.name.clone(), res.clone());
                    }
                }
                let set = Arc::new(TypeResources::from_shared(shards));
                p.residency_generation = registry.residency_generation;
                p.residency = Some(set.clone());
                set
            }
        };
        drop(registry);
        snapshot.set(type_url::ENDPOINT, eds);
        snapshot.set(type_url::POOL_STATE, pools);
        snapshot.set_type(type_url::RESIDENCY_SHARD, residency);
        self.cache.set_default(snapshot);
        let since = self
            .pending_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(since) = since {
            self.metrics
                .state_lag
                .observe(since.elapsed().as_secs_f64());
        }
    }

    /// Publishes every `publish_interval_ms` until the process ends.
    pub async fn run_publisher(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.config.publish_interval_ms.max(1),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.publish(false).await;
        }
    }

    /// The ECDS version Envoy will be sent for a pool's current strategy.
    async fn filter_version(&self, pool: &PoolSpec) -> Option<String> {
        let s = self.strategies.lock().await;
        s.current(&pool.name).map(|a| {
            envoy::routing_filter(
                &pool.name,
                &a.path.to_string_lossy(),
                &filter_configuration(pool, a),
            )
            .version
        })
    }

    async fn wait_filter(&self, pool: &PoolSpec) -> (String, Outcome) {
        let Some(version) = self.filter_version(pool).await else {
            return (String::new(), Outcome::default());
        };
        if !self.is_warm() {
            return (
                version,
                Outcome {
                    pending: self.status.connected_nodes(),
                    ..Default::default()
                },
            );
        }
        let out = self
            .status
            .wait_answers(
                type_url::EXTENSION_CONFIG,
                &envoy::filter_name(&pool.name),
                &version,
                Duration::from_millis(self.config.ack_timeout_ms),
            )
            .await;
        (version, out)
    }

    fn report(
        &self,
        pool: &PoolSpec,
        active: Option<&Active>,
        version: String,
        out: Outcome,
    ) -> PushReport {
        let result = if !out.nacked.is_empty() {
            PushResult::Nacked
        } else if out.pending.is_empty() && !out.acked.is_empty() {
            PushResult::Acked
        } else {
            PushResult::Pending
        };
        let outcome = format!("{result:?}").to_lowercase();
        self.metrics
            .strategy_pushes
            .get_or_create(&OutcomeLabel {
                pool: pool.name.clone(),
                outcome,
            })
            .inc();
        PushReport {
            pool: pool.name.clone(),
            result,
            strategy: active.map(|a| a.spec.name.clone()),
            sha256: active.map(|a| a.sha256.clone()),
            version,
            acked: out.acked,
            nacked: out.nacked,
            pending: out.pending,
        }
    }

    /// Sets a pool's strategy, pushes it by ECDS and waits for Envoy's
    /// answer. On a NACK the previous strategy is restored (Envoy keeps
    /// serving it anyway).
    pub async fn set_strategy(
        &self,
        pool: &str,
        spec: StrategySpec,
    ) -> Result<PushReport, ChangeError> {
        let pool = self.pool(pool).await?;
        let _one_at_a_time = self.change.lock().await;
        let prepared = self.strategies.lock().await.prepare(&spec).await?;
        let previous = self
            .strategies
            .lock()
            .await
            .set(&pool.name, prepared.clone())
            .await?;
        self.publish(true).await;
        let (version, out) = self.wait_filter(&pool).await;
        let nacked = !out.nacked.is_empty();
        if nacked {
            tracing::warn!(pool = %pool.name, nacks = ?out.nacked, "strategy NACKed; restoring the previous one");
            self.strategies
                .lock()
                .await
                .revert(&pool.name, previous)
                .await;
            self.publish(true).await;
        }
        Ok(self.report(&pool, Some(&prepared), version, out))
    }

    /// Goes back to the pool's previous strategy, with the same ACK/NACK report.
    pub async fn rollback(&self, pool: &str) -> Result<PushReport, ChangeError> {
        let pool = self.pool(pool).await?;
        let _one_at_a_time = self.change.lock().await;
        let (from, to) = self.strategies.lock().await.rollback(&pool.name).await?;
        self.publish(true).await;
        let (version, out) = self.wait_filter(&pool).await;
        if !out.nacked.is_empty() {
            self.strategies
                .lock()
                .await
                .undo_rollback(&pool.name, from, to.clone())
                .await;
            self.publish(true).await;
        }
        Ok(self.report(&pool, Some(&to), version, out))
    }
}

fn control(msg: control_message::Msg) -> ControlMessage {
    ControlMessage { msg: Some(msg) }
}

fn kind(report: &ReplicaReport) -> &'static str {
    match &report.event {
        Some(replica_report::Event::Register(_)) => "register",
        Some(replica_report::Event::Load(_)) => "load",
        Some(replica_report::Event::Delta(_)) => "delta",
        Some(replica_report::Event::Snapshot(_)) => "snapshot",
        Some(replica_report::Event::Cleared(_)) => "cleared",
        None => "empty",
    }
}

/// Serves one replica's `ReplicaState/Report` stream: applies each report to
/// the registry and answers `Registered`, `ResyncRequest` or `Rejected` on the
/// returned channel, which closes when the stream ends.
pub fn serve_reports<S>(
    app: Arc<App>,
    mut inbound: S,
    peer: Option<SocketAddr>,
) -> mpsc::Receiver<ControlMessage>
where
    S: Stream<Item = Result<ReplicaReport, Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut ctx = app.registry.lock().await.open_stream();
        loop {
            let report = match inbound.next().await {
                Some(Ok(r)) => r,
                Some(Err(status)) => {
                    tracing::debug!(?peer, %status, "state stream error");
                    break;
                }
                None => break,
            };
            let k = kind(&report);
            app.metrics
                .reports
                .get_or_create(&KindLabel { kind: k.into() })
                .inc();
            let result = {
                let mut reg = app.registry.lock().await;
                let r = reg.apply(&mut ctx, report, Instant::now());
                if r.is_err() {
                    reg.note_rejected(&ctx);
                }
                r
            };
            let reply = match result {
                Ok(Applied::Ok) => {
                    app.note_pending();
                    continue;
                }
                Ok(Applied::Registered(id)) => {
                    tracing::info!(replica = %id, ?peer, "replica registered");
                    app.note_pending();
                    control(control_message::Msg::Registered(Registered {
                        replica_id: id,
                    }))
                }
                Ok(Applied::Resync(reason)) => {
                    tracing::info!(replica = ?ctx.replica, %reason, "asking for a resync");
                    app.metrics.resyncs.inc();
                    control(control_message::Msg::Resync(ResyncRequest { reason }))
                }
                Err(rejection) => {
                    tracing::warn!(replica = ?ctx.replica, ?peer, kind = k, reason = %rejection, "state report rejected");
                    app.metrics.rejected.inc();
                    control(control_message::Msg::Rejected(Rejected {
                        reason: rejection.to_string(),
                    }))
                }
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        app.registry.lock().await.close_stream(&ctx);
    });
    rx
}
