//! `/metrics`: HTTP request counts plus the engine's load, cache and residency figures,
//! read from the engine's status at scrape time.

use kvmesh_gpu_server_engine::{EngineHandle, Status, TierStatus};
use kvmesh_gpu_server_kv::Tier;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type FmtResult = Result<(), std::fmt::Error>;

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
    /// Seconds from a request's submission to the engine (parsed and tokenized) to its first
    /// generated token: queueing, prefill and the first decode step.
    pub ttft: Histogram,
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
            "kvmesh_prefix_waits",
            "Requests held at admission while another sequence prefilled their prefix",
            s.prefix_waits,
        )?;
        counter(
            "kvmesh_cancelled_requests",
            "Requests dropped because the client went away",
            s.cancelled,
        )?;
        tiers(&s, &mut enc)
    }
}

/// Per-tier families (label `tier`: device, host, disk), the cost model and the disk tier.
fn tiers(s: &Status, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let rows = |f: &dyn Fn(&TierStatus) -> Option<u64>| -> Vec<(&'static str, u64)> {
        s.tiers
            .iter()
            .filter_map(|t| f(t).map(|v| (t.tier.name(), v)))
            .collect()
    };
    let mut u64_family =
        |name: &str, help: &str, counter: bool, rows: Vec<(&str, u64)>| -> FmtResult {
            if rows.is_empty() {
                return Ok(());
            }
            let kind = if counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0i64).metric_type()
            };
            let mut d = enc.encode_descriptor(name, help, None, kind)?;
            for (tier, v) in rows {
                let labels = [("tier", tier)];
                let m = d.encode_family(&labels)?;
                if counter {
                    ConstCounter::new(v).encode(m)?;
                } else {
                    ConstGauge::new(v as i64).encode(m)?;
                }
            }
            Ok(())
        };
    let on = |t: &TierStatus| t.enabled;
    u64_family(
        "kvmesh_kv_tier_capacity_blocks",
        "KV blocks a tier holds at most (0: off)",
        false,
        rows(&|t| Some(t.counters.capacity_blocks)),
    )?;
    u64_family(
        "kvmesh_kv_tier_used_blocks",
        "KV blocks held in a tier",
        false,
        rows(&|t| Some(t.counters.used_blocks)),
    )?;
    u64_family(
        "kvmesh_kv_tier_resident_chunks",
        "Text chunks resident in a tier",
        false,
        rows(&|t| Some(t.resident_chunks.len() as u64)),
    )?;
    u64_family(
        "kvmesh_kv_tier_hits",
        "Prompt blocks served from a tier",
        true,
        rows(&|t| on(t).then_some(t.counters.hits)),
    )?;
    u64_family(
        "kvmesh_kv_tier_misses",
        "Prompt blocks found neither in a tier nor in a faster one",
        true,
        rows(&|t| on(t).then_some(t.counters.misses)),
    )?;
    u64_family(
        "kvmesh_kv_tier_evictions",
        "Blocks that left a tier to make room (demoted further or dropped)",
        true,
        rows(&|t| Some(t.counters.evictions)),
    )?;
    u64_family(
        "kvmesh_kv_tier_demotions",
        "Blocks demoted into a tier",
        true,
        rows(&|t| Some(t.counters.demotions)),
    )?;
    u64_family(
        "kvmesh_kv_tier_promotions",
        "Blocks promoted from a tier into the device tier",
        true,
        rows(&|t| Some(t.counters.promotions)),
    )?;
    u64_family(
        "kvmesh_kv_tier_bytes_read",
        "Bytes copied out of a tier",
        true,
        rows(&|t| Some(t.bytes.read)),
    )?;
    u64_family(
        "kvmesh_kv_tier_bytes_written",
        "Bytes copied into a tier",
        true,
        rows(&|t| Some(t.bytes.written)),
    )?;
    u64_family(
        "kvmesh_kv_tier_fetch_beats_recompute",
        "1 when a prefix hit in this tier is fetched, 0 when the cost model recomputes it",
        false,
        rows(&|t| {
            (on(t) && t.tier != Tier::Device).then_some(u64::from(t.cost.fetch_beats_recompute))
        }),
    )?;
    let mut f64_family = |name: &str, help: &str, rows: Vec<(&str, f64)>| -> FmtResult {
        if rows.is_empty() {
            return Ok(());
        }
        let g = ConstGauge::new(0f64);
        let mut d = enc.encode_descriptor(name, help, None, g.metric_type())?;
        for (tier, v) in rows {
            let labels = [("tier", tier)];
            ConstGauge::new(v).encode(d.encode_family(&labels)?)?;
        }
        Ok(())
    };
    let frows = |f: &dyn Fn(&TierStatus) -> Option<f64>| -> Vec<(&'static str, f64)> {
        s.tiers
            .iter()
            .filter(|t| t.enabled && t.tier != Tier::Device)
            .filter_map(|t| f(t).map(|v| (t.tier.name(), v)))
            .collect()
    };
    f64_family(
        "kvmesh_kv_tier_read_bytes_per_second",
        "Measured bandwidth of fetching whole blocks from a tier into the device pool",
        frows(&|t| t.cost.read_bytes_per_s),
    )?;
    f64_family(
        "kvmesh_kv_tier_read_latency_seconds",
        "Measured time of a one-page read from a tier",
        frows(&|t| t.cost.read_latency_s),
    )?;
    f64_family(
        "kvmesh_kv_tier_fetch_block_seconds",
        "Measured time to fetch one block from a tier",
        frows(&|t| t.cost.fetch_block_s),
    )?;
    let mut gauge_f = |name: &str, help: &str, v: Option<f64>| -> FmtResult {
        let Some(v) = v else { return Ok(()) };
        let g = ConstGauge::new(v);
        g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
    };
    gauge_f(
        "kvmesh_kv_recompute_tokens_per_second",
        "Measured prefill speed of this model on this machine (the cost model's recompute side)",
        s.cost.recompute_tokens_per_s,
    )?;
    gauge_f(
        "kvmesh_kv_recompute_block_seconds",
        "Measured time to recompute one block's tokens",
        s.cost
            .recompute_tokens_per_s
            .filter(|&x| x > 0.0)
            .map(|tps| s.block_tokens as f64 / tps),
    )?;
    let d = &s.disk;
    let mut gauge = |name: &str, help: &str, v: u64| -> FmtResult {
        let g = ConstGauge::new(v as i64);
        g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
    };
    gauge(
        "kvmesh_kv_disk_enabled",
        "1 while the disk tier is in use",
        u64::from(d.enabled),
    )?;
    gauge(
        "kvmesh_kv_disk_restored_blocks",
        "Valid disk blocks indexed at start (warm restart)",
        d.restored,
    )?;
    gauge(
        "kvmesh_kv_disk_corrupt_blocks",
        "Torn or corrupt disk slots dropped (at start or on read), never served",
        d.scan.corrupt + d.read_errors,
    )?;
    gauge(
        "kvmesh_kv_disk_foreign_blocks",
        "Disk slots of another model or block layout dropped at start",
        d.scan.foreign,
    )?;
    gauge(
        "kvmesh_kv_disk_pending_writes",
        "Disk block writes queued or in flight",
        d.pending_writes,
    )?;
    let mut counter = |name: &str, help: &str, v: u64| -> FmtResult {
        let c = ConstCounter::new(v);
        c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
    };
    counter(
        "kvmesh_kv_disk_write_errors",
        "Disk block writes that failed",
        d.write_errors,
    )?;
    counter(
        "kvmesh_kv_disk_reads",
        "Disk block reads (promotions and read-aheads; a block still being written is served from its buffer and not counted)",
        d.reads,
    )?;
    counter(
        "kvmesh_kv_disk_reads_mapped",
        "Disk block reads copied out of the page cache through the slabs' mapping (the rest used pread)",
        d.reads_mapped,
    )?;
    Ok(())
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
        // 5 ms to about 41 s.
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "kvmesh_time_to_first_token_seconds",
            "Seconds from a request's submission to the engine to its first generated token",
            ttft.clone(),
        );
        registry.register_collector(Box::new(EngineCollector(engine)));
        Self {
            registry,
            requests,
            ttft,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
