//! Replays a request trace through real `.wasm` routing plugins against
//! simulated replicas, and reports how much KV cache each strategy reuses.
//!
//! Per plugin, [`simulate`] starts fresh VMs on the kvmesh host (one or more
//! "workers" sharing a `vm_id`) and fresh replicas. For every request in
//! arrival order it:
//! 1. publishes replica state when an update is due (every
//!    [`SimConfig::state_interval_ms`]): load and residency go through the
//!    SDK's `StateWriter` into the VMs' shared data, exactly the keys the
//!    state pump writes in Envoy;
//! 2. moves the VMs' virtual clock to the arrival time (ticks fire);
//! 3. sends the request through a worker VM and reads the chosen endpoint
//!    from `x-gateway-destination-endpoint` (an absent or unknown endpoint
//!    falls back to round-robin, as Envoy's `override_host` does); the
//!    stream stays open until the simulated response ends, so the plugin's
//!    own in-flight counts (prefix-aware's load bound) see real concurrency;
//! 4. serves it on that replica: the resident prefix (per tier) is reused,
//!    the rest is prefilled, then the prompt's chunks are made resident.
//!
//! Service-time model (per replica): prefills run one at a time, FIFO;
//! decoding overlaps (continuous batching). TTFT = queueing for prefill +
//! prefill of uncached tokens + fetch of tier-resident tokens + one decode
//! step. Load published = requests waiting for prefill, requests running,
//! and queued prefill tokens.
//!
//! The oracle has one infinite cache and perfect routing: a request's cached
//! tokens are its longest prefix seen in any earlier request.

mod cache;
mod report;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use kvmesh_host_runtime::{Host, HostError, HttpRequest, HttpResponse, PluginConfig};
use kvmesh_host_trace::TraceRequest;
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::prompt::{Api, parse};
use kvmesh_plugins_sdk::proto;
use kvmesh_plugins_sdk::state::StateWriter;

pub use cache::{SHARDS, TierIx, TieredCache};
pub use report::{PluginReport, Report};

/// The header a routing plugin writes its choice into.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// The simulated pool and its cost model.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Pool name (shared-data keys) and model name (hash seed).
    pub pool: String,
    /// Model name.
    pub model: String,
    /// Number of replicas.
    pub replicas: usize,
    /// KV capacity per replica in text chunks: device, host, disk.
    pub capacity_chunks: [usize; 3],
    /// Text chunk size.
    pub chunk_bytes: u32,
    /// Canonical prompt bytes per token (4 is typical for English).
    pub bytes_per_token: f64,
    /// Prefill cost per uncached token, microseconds.
    pub prefill_us_per_token: f64,
    /// Fetch cost per cached token from device, host, disk, microseconds.
    pub fetch_us_per_token: [f64; 3],
    /// Decode cost per output token, microseconds.
    pub decode_us_per_token: f64,
    /// How often replica state reaches the plugins.
    pub state_interval_ms: f64,
    /// Worker VMs per plugin (requests rotate across them).
    pub workers: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            pool: "sim".to_owned(),
            model: "sim-model".to_owned(),
            replicas: 4,
            capacity_chunks: [4096, 16384, 65536],
            chunk_bytes: 256,
            bytes_per_token: 4.0,
            prefill_us_per_token: 100.0,
            fetch_us_per_token: [0.0, 10.0, 40.0],
            decode_us_per_token: 20_000.0,
            state_interval_ms: 100.0,
            workers: 1,
        }
    }
}

/// One plugin to compare.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Label in the report.
    pub name: String,
    /// The `.wasm` file.
    pub wasm: PathBuf,
    /// Plugin configuration (`proxy_on_configure`), usually JSON.
    pub config: Vec<u8>,
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The host refused the plugin or the plugin trapped.
    #[error("plugin {plugin}: {source}")]
    Host {
        /// Which plugin.
        plugin: String,
        /// What happened.
        source: HostError,
    },
    /// A configuration that cannot be simulated.
    #[error("bad simulation config: {0}")]
    Config(String),
}

/// A request prepared once for all plugins.
struct Prepared {
    at_us: f64,
    path: String,
    body: Vec<u8>,
    chunks: Vec<u64>,
    prompt_tokens: f64,
    output_tokens: u32,
}

fn prepare(trace: &[TraceRequest], cfg: &SimConfig) -> Vec<Prepared> {
    trace
        .iter()
        .map(|r| {
            let body = r.body_bytes();
            let parsed = Api::from_path(&r.path)
                .ok_or(())
                .and_then(|api| parse(api, &body).map_err(|_| ()));
            let (chunks, prompt_bytes) = match parsed.ok().and_then(|p| {
                let canonical = p.canonical.into_iter().next()?;
                Some((p.model, canonical))
            }) {
                Some((model, canonical)) => (
                    chunk_hashes(&model, &canonical, cfg.chunk_bytes),
                    canonical.len(),
                ),
                None => (Vec::new(), body.len()),
            };
            Prepared {
                at_us: r.at_ms * 1000.0,
                path: r.path.clone(),
                body,
                chunks,
                prompt_tokens: (prompt_bytes as f64 / cfg.bytes_per_token).ceil(),
                output_tokens: r.output_tokens,
            }
        })
        .collect()
}

/// A request in a replica's pipeline.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    start_us: f64,
    finish_us: f64,
    uncached_tokens: f64,
}

#[derive(Debug)]
struct Replica {
    id: String,
    address: String,
    cache: TieredCache,
    prefill_free_us: f64,
    inflight: Vec<InFlight>,
    served: u64,
}

impl Replica {
    fn load(&mut self, now_us: f64, capacity: [usize; 3]) -> proto::Load {
        self.inflight.retain(|f| f.finish_us > now_us);
        let waiting: Vec<&InFlight> = self
            .inflight
            .iter()
            .filter(|f| f.start_us > now_us)
            .collect();
        let used = self.cache.used();
        proto::Load {
            waiting: waiting.len() as u32,
            running: (self.inflight.len() - waiting.len()) as u32,
            queued_prefill_tokens: waiting.iter().map(|f| f.uncached_tokens).sum::<f64>() as u64,
            kv: (0..3)
                .map(|t| proto::TierUsage {
                    tier: t as i32 + 1,
                    used_blocks: used[t] as u64,
                    capacity_blocks: capacity[t] as u64,
                })
                .collect(),
        }
    }
}

/// Replays `trace` through every plugin in `plugins`; one report row each.
pub fn simulate(
    trace: &[TraceRequest],
    plugins: &[PluginSpec],
    cfg: &SimConfig,
) -> Result<Report, SimError> {
    if cfg.replicas == 0 || cfg.workers == 0 || cfg.chunk_bytes == 0 {
        return Err(SimError::Config(
            "replicas, workers and chunk_bytes must be positive".to_owned(),
        ));
    }
    let prepared = prepare(trace, cfg);
    let (oracle_cached, total_prompt) = oracle(&prepared, cfg);
    let mut rows = Vec::with_capacity(plugins.len());
    for spec in plugins {
        rows.push(run_one(&prepared, spec, cfg, oracle_cached, total_prompt)?);
    }
    Ok(Report {
        requests: trace.len(),
        replicas: cfg.replicas,
        capacity_chunks: cfg.capacity_chunks,
        oracle_ratio: ratio(oracle_cached, total_prompt),
        plugins: rows,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn cached_tokens(matched_chunks: usize, prompt_tokens: f64, cfg: &SimConfig) -> f64 {
    (matched_chunks as f64 * f64::from(cfg.chunk_bytes) / cfg.bytes_per_token).min(prompt_tokens)
}

/// Infinite cache, best routing: the longest prefix any earlier request had.
fn oracle(reqs: &[Prepared], cfg: &SimConfig) -> (f64, f64) {
    let mut seen: HashSet<u64> = HashSet::new();
    let (mut cached, mut total) = (0.0, 0.0);
    for r in reqs {
        let m = r.chunks.iter().take_while(|c| seen.contains(c)).count();
        cached += cached_tokens(m, r.prompt_tokens, cfg);
        total += r.prompt_tokens;
        seen.extend(r.chunks.iter().copied());
    }
    (cached, total)
}

fn run_one(
    reqs: &[Prepared],
    spec: &PluginSpec,
    cfg: &SimConfig,
    oracle_cached: f64,
    total_prompt: f64,
) -> Result<PluginReport, SimError> {
    let err = |source| SimError::Host {
        plugin: spec.name.clone(),
        source,
    };
    let host = Host::new().map_err(err)?;
    let module = host.load_file(&spec.wasm).map_err(err)?;
    let vm_id = format!("kvmesh-sim-{}", spec.name);
    let mut workers = Vec::with_capacity(cfg.workers);
    for _ in 0..cfg.workers {
        let pc = PluginConfig::new(&vm_id, &spec.config).root_id(&spec.name);
        workers.push(host.start(&module, pc).map_err(err)?);
    }
    let shared = host.vm(&vm_id);
    let mut replicas: Vec<Replica> = (0..cfg.replicas)
        .map(|i| Replica {
            id: format!("r{i}"),
            address: format!("10.0.{}.{}:8000", i / 250, i % 250 + 1),
            cache: TieredCache::new(cfg.capacity_chunks),
            prefill_free_us: 0.0,
            inflight: Vec::new(),
            served: 0,
        })
        .collect();
    let by_address: std::collections::HashMap<String, usize> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (r.address.clone(), i))
        .collect();
    let mut writer = StateWriter::new(&cfg.pool, 1);
    let mut publish = |replicas: &mut [Replica], now_us: f64| {
        let state = proto::PoolState {
            pool: cfg.pool.clone(),
            model: cfg.model.clone(),
            chunk_bytes: cfg.chunk_bytes,
            replicas: replicas
                .iter_mut()
                .map(|r| proto::ReplicaInfo {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    load: Some(r.load(now_us, cfg.capacity_chunks)),
                })
                .collect(),
        };
        writer.set_pool_state(&state);
        for r in replicas.iter_mut() {
            for shard in r.cache.take_dirty() {
                let tiers = r.cache.shard(shard);
                writer.set_shard(&proto::ResidencyShard {
                    pool: cfg.pool.clone(),
                    replica_id: r.id.clone(),
                    shard,
                    shard_count: SHARDS,
                    resident: tiers
                        .into_iter()
                        .enumerate()
                        .filter(|(_, c)| !c.is_empty())
                        .map(|(t, chunks)| proto::TierChunks {
                            tier: t as i32 + 1,
                            chunks,
                        })
                        .collect(),
                });
            }
        }
        for (key, value) in writer.flush() {
            // Unconditional write (CAS 0), as the state pump does.
            let _ = shared.set(&key, &value, 0);
        }
    };
    publish(&mut replicas, 0.0);

    let interval_us = cfg.state_interval_ms.max(0.001) * 1000.0;
    let mut next_publish_us = interval_us;
    let mut clock_us = 0.0f64;
    let mut rotation = 0usize;
    let mut open: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize, u32)>> =
        std::collections::BinaryHeap::new();
    let mut ttfts = Vec::with_capacity(reqs.len());
    let (mut cached_total, mut fallbacks, mut errors) = (0.0, 0u64, 0u64);
    for (n, r) in reqs.iter().enumerate() {
        while next_publish_us <= r.at_us {
            publish(&mut replicas, next_publish_us);
            next_publish_us += interval_us;
        }
        let step = (r.at_us - clock_us).max(0.0);
        clock_us = r.at_us;
        for w in &mut workers {
            w.advance(Duration::from_nanos((step * 1000.0) as u64))
                .map_err(err)?;
        }
        // Streams end when their response would: the plugin sees requests
        // in flight exactly as long as the simulated replica works on them.
        while let Some(&std::cmp::Reverse((end, w, id))) = open.peek() {
            if f64::from_bits(end) > r.at_us {
                break;
            }
            open.pop();
            workers[w]
                .finish(id, Some(HttpResponse::new(200, b"{}")))
                .map_err(err)?;
        }
        let w = n % cfg.workers;
        let req = HttpRequest::post_json(&r.path, &r.body);
        let (stream, chosen) = match workers[w].begin(req) {
            Ok(id) => (
                Some(id),
                workers[w]
                    .request_headers(id)
                    .and_then(|h| h.get(DESTINATION_HEADER))
                    .and_then(|v| v.split(',').next())
                    .and_then(|primary| by_address.get(primary.trim()).copied()),
            ),
            Err(e @ HostError::Trap { .. }) => return Err(err(e)),
            Err(_) => {
                errors += 1;
                (None, None)
            }
        };
        let idx = match chosen {
            Some(i) => i,
            None => {
                fallbacks += 1;
                rotation += 1;
                rotation % cfg.replicas
            }
        };
        let rep = &mut replicas[idx];
        rep.served += 1;
        let tiers = rep.cache.prefix(&r.chunks);
        let cached = cached_tokens(tiers.len(), r.prompt_tokens, cfg);
        let per_chunk = f64::from(cfg.chunk_bytes) / cfg.bytes_per_token;
        let fetch_us: f64 = tiers
            .iter()
            .map(|&t| cfg.fetch_us_per_token[t] * per_chunk)
            .sum();
        let uncached = r.prompt_tokens - cached;
        let start = r.at_us.max(rep.prefill_free_us);
        let prefill_end = start + uncached * cfg.prefill_us_per_token + fetch_us;
        rep.prefill_free_us = prefill_end;
        let first_token = prefill_end + cfg.decode_us_per_token;
        let finish =
            first_token + f64::from(r.output_tokens.saturating_sub(1)) * cfg.decode_us_per_token;
        rep.inflight.push(InFlight {
            start_us: start,
            finish_us: finish,
            uncached_tokens: uncached,
        });
        rep.cache.insert(&r.chunks);
        if let Some(id) = stream {
            // Finish times are non-negative, so their bit patterns sort as
            // the numbers do.
            open.push(std::cmp::Reverse((finish.max(0.0).to_bits(), w, id)));
        }
        cached_total += cached;
        ttfts.push((first_token - r.at_us) / 1000.0);
    }
    let served: Vec<u64> = replicas.iter().map(|r| r.served).collect();
    Ok(PluginReport::new(
        &spec.name,
        cached_total,
        total_prompt,
        oracle_cached,
        &served,
        ttfts,
        fallbacks,
        errors,
    ))
}

/// The plugin configuration the control plane pushes for a pool (the
/// filter's JSON config: `pool`, `chunk_bytes`; strategy parameters at their
/// defaults). The model comes with the live state.
pub fn default_plugin_config(pool: &str, chunk_bytes: u32) -> String {
    serde_json::json!({
        "pool": pool,
        "chunk_bytes": chunk_bytes,
    })
    .to_string()
}
