//! The tonic ADS service: one task per stream, state-of-the-world or delta,
//! answering requests and snapshot changes of the stream's node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::SnapshotCache;
use crate::delta::DeltaType;
use crate::resource::Snapshot;
use crate::sotw::{Reply, SotwType};
use crate::status::{Answer, StatusTracker};

/// Hooks for metrics; every method has a no-op default.
pub trait Observer: Send + Sync + std::fmt::Debug + 'static {
    /// A response went out.
    fn pushed(&self, _node: &str, _type_url: &str, _resources: usize, _bytes: usize) {}
    /// The node answered a response `latency` after it was sent.
    fn answered(&self, _node: &str, _type_url: &str, _answer: &Answer, _latency: Duration) {}
    /// A stream opened (`true`) or closed (`false`).
    fn stream(&self, _node: &str, _delta: bool, _open: bool) {}
}

#[derive(Debug)]
struct NoObserver;
impl Observer for NoObserver {}

/// The ADS server. Cheap to clone; all clones share the cache and tracker.
#[derive(Debug, Clone)]
pub struct XdsServer {
    cache: Arc<SnapshotCache>,
    status: Arc<StatusTracker>,
    observer: Arc<dyn Observer>,
    /// Delta responses are split to stay about this size (the state pump
    /// refuses messages over its own limit).
    max_delta_bytes: usize,
}

/// Default bound of one delta response.
pub const DEFAULT_MAX_DELTA_BYTES: usize = 4 << 20;

impl XdsServer {
    pub fn new(cache: Arc<SnapshotCache>, status: Arc<StatusTracker>) -> Self {
        Self {
            cache,
            status,
            observer: Arc::new(NoObserver),
            max_delta_bytes: DEFAULT_MAX_DELTA_BYTES,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// Bounds the size of one delta response (resources are spread over
    /// several responses; a single larger resource still goes alone).
    pub fn with_max_delta_bytes(mut self, max: usize) -> Self {
        self.max_delta_bytes = max.max(1);
        self
    }

    /// The tonic service to add to a `Server`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// Marks a node connected for as long as the stream lives.
struct Connected {
    status: Arc<StatusTracker>,
    observer: Arc<dyn Observer>,
    node: String,
    delta: bool,
}

impl Connected {
    fn new(server: &XdsServer, node: String, delta: bool) -> Self {
        server.status.connected(&node);
        server.observer.stream(&node, delta, true);
        Self {
            status: server.status.clone(),
            observer: server.observer.clone(),
            node,
            delta,
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.status.disconnected(&self.node);
        self.observer.stream(&self.node, self.delta, false);
    }
}

/// Send times of responses, to measure how long the node took to answer.
#[derive(Default)]
struct SentAt(HashMap<String, Instant>);

impl SentAt {
    fn record(&mut self, nonce: &str) {
        if self.0.len() > 256 {
            let cutoff = Instant::now() - Duration::from_secs(60);
            self.0.retain(|_, t| *t > cutoff);
        }
        self.0.insert(nonce.to_owned(), Instant::now());
    }

    fn take(&mut self, nonce: &str) -> Duration {
        self.0
            .remove(nonce)
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

type SnapRx = watch::Receiver<Option<Arc<Snapshot>>>;

struct SotwStream {
    server: XdsServer,
    node: String,
    types: BTreeMap<String, SotwType>,
    nonce: u64,
    sent_at: SentAt,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl SotwStream {
    async fn on_request(&mut self, req: DiscoveryRequest, snap: &SnapRx) -> bool {
        let t = self
            .types
            .entry(req.type_url.clone())
            .or_insert_with(|| SotwType::new(&req.type_url));
        let reply = t.on_request(&req);
        if let Some((sent, answer)) = reply.answer() {
            if let Answer::Nacked(msg) = &answer {
                tracing::warn!(node = %self.node, type_url = %req.type_url, version = %sent.version, %msg, "NACK");
            }
            let latency = self.sent_at.take(&sent.nonce);
            self.server
                .status
                .answered(&self.node, &req.type_url, &sent.resources, &answer);
            self.server
                .observer
                .answered(&self.node, &req.type_url, &answer, latency);
        }
        if reply == Reply::Stale {
            return true;
        }
        self.respond(&req.type_url, snap).await
    }

    async fn respond(&mut self, type_url: &str, snap: &SnapRx) -> bool {
        let current = snap.borrow().clone();
        let Some(current) = current else { return true };
        let Some(resources) = current.get(type_url) else {
            return true;
        };
        let Some(t) = self.types.get_mut(type_url) else {
            return true;
        };
        self.nonce += 1;
        let Some(resp) = t.respond(resources, self.nonce.to_string()) else {
            return true;
        };
        if let Some(sent) = t.last() {
            self.server
                .status
                .sent(&self.node, type_url, &sent.resources);
        }
        self.sent_at.record(&resp.nonce);
        self.server.observer.pushed(
            &self.node,
            type_url,
            resp.resources.len(),
            resp.encoded_len(),
        );
        self.tx.send(Ok(resp)).await.is_ok()
    }

    async fn respond_all(&mut self, snap: &SnapRx) -> bool {
        let urls: Vec<String> = self.types.keys().cloned().collect();
        for u in urls {
            if !self.respond(&u, snap).await {
                return false;
            }
        }
        true
    }
}

struct DeltaStream {
    server: XdsServer,
    node: String,
    types: BTreeMap<String, DeltaType>,
    nonce: u64,
    sent_at: SentAt,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaStream {
    async fn on_request(&mut self, req: DeltaDiscoveryRequest, snap: &SnapRx) -> bool {
        let t = self
            .types
            .entry(req.type_url.clone())
            .or_insert_with(|| DeltaType::new(&req.type_url));
        let reply = t.on_request(&req);
        if let Some((sent, answer)) = reply.answer() {
            if let Answer::Nacked(msg) = &answer {
                tracing::warn!(node = %self.node, type_url = %req.type_url, %msg, "delta NACK");
            }
            let latency = self.sent_at.take(&sent.nonce);
            self.server
                .status
                .answered(&self.node, &req.type_url, &sent.resources, &answer);
            self.server
                .observer
                .answered(&self.node, &req.type_url, &answer, latency);
        }
        if !t.dirty() {
            return true;
        }
        self.respond(&req.type_url, snap).await
    }

    async fn respond(&mut self, type_url: &str, snap: &SnapRx) -> bool {
        let current = snap.borrow().clone();
        let Some(current) = current else { return true };
        let Some(resources) = current.get(type_url) else {
            return true;
        };
        let max = self.server.max_delta_bytes;
        loop {
            let Some(t) = self.types.get_mut(type_url) else {
                return true;
            };
            self.nonce += 1;
            let Some(resp) = t.respond_bounded(resources, self.nonce.to_string(), max) else {
                return true;
            };
            if !self.send(type_url, resp).await {
                return false;
            }
        }
    }

    async fn send(&mut self, type_url: &str, resp: DeltaDiscoveryResponse) -> bool {
        let sent: Vec<(String, String)> = resp
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        self.server.status.sent(&self.node, type_url, &sent);
        self.sent_at.record(&resp.nonce);
        self.server.observer.pushed(
            &self.node,
            type_url,
            resp.resources.len(),
            resp.encoded_len(),
        );
        self.tx.send(Ok(resp)).await.is_ok()
    }

    async fn respond_all(&mut self, snap: &SnapRx) -> bool {
        let urls: Vec<String> = self.types.keys().cloned().collect();
        for u in urls {
            if !self.respond(&u, snap).await {
                return false;
            }
        }
        true
    }
}

fn node_id(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> String {
    node.map(|n| n.id.clone()).unwrap_or_default()
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let server = self.clone();
        tokio::spawn(async move {
            let Some(Ok(first)) = inbound.next().await else {
                return;
            };
            let node = node_id(first.node.as_ref());
            let _connected = Connected::new(&server, node.clone(), false);
            tracing::info!(%node, "SotW ADS stream opened");
            let mut snap = server.cache.watch(&node);
            let mut s = SotwStream {
                server,
                node,
                types: BTreeMap::new(),
                nonce: 0,
                sent_at: SentAt::default(),
                tx,
            };
            if !s.on_request(first, &snap).await {
                return;
            }
            loop {
                tokio::select! {
                    req = inbound.next() => match req {
                        Some(Ok(req)) => if !s.on_request(req, &snap).await { break },
                        Some(Err(e)) => { tracing::info!(node = %s.node, error = %e, "ADS stream error"); break }
                        None => break,
                    },
                    changed = snap.changed() => {
                        if changed.is_err() || !s.respond_all(&snap).await { break }
                    }
                }
            }
            tracing::info!(node = %s.node, "SotW ADS stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let server = self.clone();
        tokio::spawn(async move {
            let Some(Ok(first)) = inbound.next().await else {
                return;
            };
            let node = node_id(first.node.as_ref());
            let _connected = Connected::new(&server, node.clone(), true);
            tracing::info!(%node, "delta ADS stream opened");
            let mut snap = server.cache.watch(&node);
            let mut s = DeltaStream {
                server,
                node,
                types: BTreeMap::new(),
                nonce: 0,
                sent_at: SentAt::default(),
                tx,
            };
            if !s.on_request(first, &snap).await {
                return;
            }
            loop {
                tokio::select! {
                    req = inbound.next() => match req {
                        Some(Ok(req)) => if !s.on_request(req, &snap).await { break },
                        Some(Err(e)) => { tracing::info!(node = %s.node, error = %e, "delta stream error"); break }
                        None => break,
                    },
                    changed = snap.changed() => {
                        if changed.is_err() || !s.respond_all(&snap).await { break }
                    }
                }
            }
            tracing::info!(node = %s.node, "delta ADS stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
