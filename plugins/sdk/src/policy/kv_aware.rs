//! KV-aware: trades the prefill a replica saves (its resident prefix of the
//! request, by tier) against the prefill already queued on it.
//!
//! For each replica `r`:
//!
//! ```text
//! score(r) = sum over the request's leading chunks that r holds of
//!                tokens_per_chunk * weight(best tier holding it)
//!          - load_weight * (queued_prefill_tokens(r) + pending(r))
//!          - running_weight * running(r)
//! ```
//!
//! The prefix stops at the first chunk `r` does not hold (a chunk only counts
//! with all chunks before it). Tier weights say how much of a recompute a hit
//! in that tier saves: device 1, host and disk less, 0 where fetching is no
//! faster than recomputing (the model server measures this; set the weights
//! from its `/metrics`). With `load_weight = 1` the score is the prefill time,
//! in tokens, that the request would wait for on `r`, negated: the smooth
//! trade-off the design asks for, with no thresholds.
//!
//! Between load reports (every 100 ms) the policy adds what it routed itself
//! (`pending`), and it remembers where it sent each chunk (speculative
//! residency) so a burst of requests for a new prefix does not scatter before
//! the replica reports holding it.

use serde::Deserialize;

use super::{AgingMap, Choice, ConfigError, Event, Policy, Reason, Request, rank_by};
use crate::snapshot::{DEVICE, DISK, HOST, ReplicaRef, Snapshot};

/// Parameters of [`KvAware`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvAwareConfig {
    /// Weight of a device-tier hit.
    pub device_weight: f64,
    /// Weight of a host-tier hit.
    pub host_weight: f64,
    /// Weight of a disk-tier hit.
    pub disk_weight: f64,
    /// Weight of a chunk this policy routed to a replica that has not yet
    /// reported holding it.
    pub speculative_weight: f64,
    /// Cost of one queued prefill token against one saved token.
    pub load_weight: f64,
    /// Cost, in tokens, of each running request.
    pub running_weight: f64,
    /// Canonical bytes per token, to turn chunks into tokens.
    pub bytes_per_token: f64,
    /// Speculative residency entries kept.
    pub speculative_capacity: usize,
    /// Fallbacks listed after the primary.
    pub max_fallbacks: usize,
}

impl Default for KvAwareConfig {
    fn default() -> Self {
        Self {
            device_weight: 1.0,
            host_weight: 0.8,
            disk_weight: 0.4,
            speculative_weight: 0.9,
            load_weight: 1.0,
            running_weight: 8.0,
            bytes_per_token: 4.0,
            speculative_capacity: 100_000,
            max_fallbacks: 2,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct KvAware {
    config: KvAwareConfig,
    speculative: AgingMap<ReplicaRef>,
    /// Per slot: (replica, load version seen, prefill tokens routed since).
    pending: Vec<(ReplicaRef, u64, u64)>,
}

impl Default for KvAware {
    fn default() -> Self {
        let config = KvAwareConfig::default();
        Self {
            speculative: AgingMap::new(config.speculative_capacity),
            config,
            pending: Vec::new(),
        }
    }
}

impl KvAware {
    /// Checks the parameters.
    pub fn new(config: KvAwareConfig) -> Result<Self, ConfigError> {
        let finite_nonneg = [
            ("device_weight", config.device_weight),
            ("host_weight", config.host_weight),
            ("disk_weight", config.disk_weight),
            ("speculative_weight", config.speculative_weight),
            ("load_weight", config.load_weight),
            ("running_weight", config.running_weight),
        ];
        for (name, v) in finite_nonneg {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::Invalid {
                    strategy: "kv-aware",
                    message: format!("{name} must be a finite number >= 0, got {v}"),
                });
            }
        }
        if !(config.bytes_per_token.is_finite() && config.bytes_per_token > 0.0) {
            return Err(ConfigError::Invalid {
                strategy: "kv-aware",
                message: "bytes_per_token must be > 0".into(),
            });
        }
        Ok(Self {
            speculative: AgingMap::new(config.speculative_capacity.max(2)),
            config,
            pending: Vec::new(),
        })
    }

    fn tier_weight(&self, tiers: u8) -> f64 {
        let mut w: f64 = 0.0;
        if tiers & DEVICE != 0 {
            w = w.max(self.config.device_weight);
        }
        if tiers & HOST != 0 {
            w = w.max(self.config.host_weight);
        }
        if tiers & DISK != 0 {
            w = w.max(self.config.disk_weight);
        }
        w
    }

    /// Prefill tokens this instance routed to `r` since its last load report.
    pub fn pending(&self, snapshot: &Snapshot, r: ReplicaRef) -> u64 {
        match (self.pending.get(r.slot()), snapshot.get(r)) {
            (Some(&(owner, version, tokens)), Some(rep))
                if owner == r && version == rep.load_version =>
            {
                tokens
            }
            _ => 0,
        }
    }

    /// Per slot: (tokens saved, chunks matched) for the request's prefix.
    pub fn matches(&self, snapshot: &Snapshot, chunks: &[u64]) -> Vec<(f64, u32)> {
        let tokens_per_chunk = f64::from(snapshot.chunk_bytes()) / self.config.bytes_per_token;
        let mut out = vec![(0.0, 0u32); snapshot.slot_count()];
        let mut alive: Vec<ReplicaRef> = snapshot.replicas().map(|(r, _)| r).collect();
        for (i, &c) in chunks.iter().enumerate() {
            if alive.is_empty() {
                break;
            }
            let holders = snapshot.holders(c);
            let spec = self.speculative.get(c);
            alive.retain(|&r| {
                let held = holders
                    .iter()
                    .find(|h| h.slot as usize == r.slot())
                    .map_or(0.0, |h| self.tier_weight(h.tiers));
                let w = if spec == Some(r) {
                    held.max(self.config.speculative_weight)
                } else {
                    held
                };
                if w <= 0.0 {
                    return false;
                }
                let m = &mut out[r.slot()];
                m.0 += w * tokens_per_chunk;
                m.1 = i as u32 + 1;
                true
            });
        }
        out
    }
}

impl Policy for KvAware {
    fn name(&self) -> &'static str {
        "kv-aware"
    }

    fn select(&self, snapshot: &Snapshot, request: &Request<'_>) -> Choice {
        let matches = self.matches(snapshot, request.chunks);
        let cfg = &self.config;
        let mut choice = rank_by(
            snapshot,
            cfg.max_fallbacks,
            Reason::Load,
            request.chunks.first().copied().unwrap_or(0),
            |r, rep| {
                let saved = matches.get(r.slot()).map_or(0.0, |m| m.0);
                let queued = rep.load.queued_prefill_tokens + self.pending(snapshot, r);
                saved
                    - cfg.load_weight * queued as f64
                    - cfg.running_weight * f64::from(rep.load.running)
            },
        );
        if let Some(p) = choice.primary {
            choice.matched_chunks = matches.get(p.slot()).map_or(0, |m| m.1);
            choice.reason = if request.chunks.is_empty() {
                Reason::NoPrompt
            } else if choice.matched_chunks > 0 {
                Reason::Resident
            } else {
                Reason::Load
            };
        }
        choice
    }

    fn observe(&mut self, snapshot: &Snapshot, event: &Event<'_>) {
        let Event::Routed { request, choice } = *event else {
            return;
        };
        let Some(r) = choice.primary else { return };
        let Some(rep) = snapshot.get(r) else { return };
        let tokens_per_chunk = f64::from(snapshot.chunk_bytes()) / self.config.bytes_per_token;
        let prompt_tokens = request.prompt_bytes as f64 / self.config.bytes_per_token;
        let cached = f64::from(choice.matched_chunks) * tokens_per_chunk;
        let uncached = (prompt_tokens - cached).max(0.0) as u64;
        let pending = self.pending(snapshot, r);
        let slot = r.slot();
        if self.pending.len() <= slot {
            self.pending.resize(slot + 1, (r, 0, 0));
        }
        self.pending[slot] = (r, rep.load_version, pending + uncached);
        for &c in request.chunks {
            self.speculative.insert(c, r);
        }
    }
}
