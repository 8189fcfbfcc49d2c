//! `/metrics`: HTTP request counts plus the engine's load, cache and residency figures,
//! read from the engine's status at scrape time.

use kvmesh_gpu_server_engine::EngineHandle;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

/// The server's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
}

#[derive(Debug)]
struct EngineCollector(EngineHandle);

impl prometheus_client::collector::Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.status();
        let mut gauge = |name: &str, help: &str, v: i64| -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "kvmesh_requests_waiting",
            "Requests queued, not yet admitted",
            i64::from(s.load.waiting),
        )?;
        gauge(
            "kvmesh_requests_running",
            "Requests in the running batch",
            i64::from(s.load.running),
        )?;
        gauge(
            "kvmesh_queued_prefill_tokens",
            "Prompt tokens admitted or queued but not yet prefilled",
            s.load.queued_prefill_tokens as i64,
        )?;
        gauge(
            "kvmesh_kv_blocks_capacity",
            "KV blocks in the device tier",
            s.cache.num_blocks as i64,
        )?;
        gauge(
            "kvmesh_kv_blocks_in_use",
            "KV blocks referenced by running sequences",
            s.cache.in_use as i64,
        )?;
        gauge(
            "kvmesh_kv_blocks_cached",
            "Unreferenced sealed KV blocks kept for prefix reuse",
            s.cache.cached as i64,
        )?;
        gauge(
            "kvmesh_kv_blocks_free",
            "Empty KV blocks",
            s.cache.free as i64,
        )?;
        gauge(
            "kvmesh_resident_chunks",
            "Text chunks whose KV is resident in the device tier",
            s.cache.resident_chunks as i64,
        )?;
        gauge(
            "kvmesh_residency_seq",
            "Sequence number of the last residency delta",
            s.residency_seq as i64,
        )?;
        gauge(
            "kvmesh_kv_pool_bytes",
            "Bytes of the physical KV pool",
            s.pool_bytes as i64,
        )?;
        gauge(
            "kvmesh_kv_pool_bytes_per_token",
            "Bytes of KV one token takes in the pool",
            s.pool_bytes_per_token as i64,
        )?;
        let mut counter = |name: &str, help: &str, v: u64| -> Result<(), std::fmt::Error> {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        };
        counter(
            "kvmesh_prefix_cache_evictions",
            "KV blocks evicted from the prefix cache",
            s.cache.evictions,
        )?;
        counter(
            "kvmesh_prefix_cache_hit_blocks",
            "Prompt blocks found in the prefix cache",
            s.cache.hit_blocks,
        )?;
        counter(
            "kvmesh_prefix_cache_lookup_blocks",
            "Prompt blocks looked up in the prefix cache",
            s.cache.lookup_blocks,
        )?;
        counter(
            "kvmesh_prompt_tokens",
            "Prompt tokens admitted",
            s.prompt_tokens,
        )?;
        counter(
            "kvmesh_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            s.cached_prompt_tokens,
        )?;
        counter(
            "kvmesh_generated_tokens",
            "Tokens generated",
            s.generated_tokens,
        )?;
        counter("kvmesh_engine_steps", "Engine steps run", s.steps)?;
        counter(
            "kvmesh_preemptions",
            "Sequences preempted for lack of KV blocks",
            s.preemptions,
        )?;
        counter(
            "kvmesh_cancelled_requests",
            "Requests dropped because the client went away",
            s.cancelled,
        )?;
        Ok(())
    }
}

impl Metrics {
    pub fn new(engine: EngineHandle) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "kvmesh_http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        registry.register_collector(Box::new(EngineCollector(engine)));
        Self { registry, requests }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
