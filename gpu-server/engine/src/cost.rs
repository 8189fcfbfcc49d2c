//! The fetch-or-recompute decision, from measurements on this machine: how fast the model
//! prefills (tokens/s, from the engine's own prefill steps) against how long one block takes
//! to fetch from each tier (from the copies and reads the tiers actually make, seeded by a
//! calibration at start). A tier is used for a prefix hit only while fetching a block from it
//! is faster than recomputing the block's tokens.

use kvmesh_gpu_server_kv::Tier;
use serde::Serialize;

/// When to fetch a cached block from a lower tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum FetchPolicy {
    /// Fetch when the measured fetch time beats the measured recompute time (or either is
    /// not measured yet).
    #[default]
    CostModel,
    /// Always fetch (tests; benchmarks of the tiers themselves).
    Always,
}

/// Exponentially weighted mean; `None` until the first sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Ewma(Option<f64>);

impl Ewma {
    const ALPHA: f64 = 0.2;

    pub(crate) fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.0 = Some(match self.0 {
            None => x,
            Some(m) => m + Self::ALPHA * (x - m),
        });
    }

    pub(crate) fn get(&self) -> Option<f64> {
        self.0
    }
}

/// Measured cost of reading one tier.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct TierCost {
    /// Seconds to fetch one whole block into the device pool.
    pub(crate) block_secs: Ewma,
    /// Seconds of a minimal (one page) read: the tier's latency.
    pub(crate) latency_secs: Ewma,
}

/// The measurements and the decision they imply.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CostModel {
    pub(crate) policy: FetchPolicy,
    pub(crate) block_tokens: usize,
    pub(crate) block_bytes: usize,
    /// Prefill tokens per second of the model on this machine.
    pub(crate) prefill_tps: Ewma,
    /// Host then disk.
    pub(crate) host: TierCost,
    pub(crate) disk: TierCost,
}

/// The figures `/metrics` publishes for one lower tier.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TierCostReport {
    pub read_bytes_per_s: Option<f64>,
    pub read_latency_s: Option<f64>,
    pub fetch_block_s: Option<f64>,
    pub recompute_block_s: Option<f64>,
    /// Whether a hit in this tier is fetched (true) or recomputed (false).
    pub fetch_beats_recompute: bool,
}

impl CostModel {
    pub(crate) fn new(policy: FetchPolicy, block_tokens: usize, block_bytes: usize) -> Self {
        Self {
            policy,
            block_tokens,
            block_bytes,
            ..Self::default()
        }
    }

    fn tier(&self, t: Tier) -> Option<&TierCost> {
        match t {
            Tier::Device => None,
            Tier::Host => Some(&self.host),
            Tier::Disk => Some(&self.disk),
        }
    }

    pub(crate) fn tier_mut(&mut self, t: Tier) -> Option<&mut TierCost> {
        match t {
            Tier::Device => None,
            Tier::Host => Some(&mut self.host),
            Tier::Disk => Some(&mut self.disk),
        }
    }

    /// A prefill-heavy step ran `tokens` tokens in `secs`.
    pub(crate) fn record_prefill(&mut self, tokens: usize, secs: f64) {
        if tokens >= 32 && secs > 0.0 {
            self.prefill_tps.add(tokens as f64 / secs);
        }
    }

    /// One block was fetched from `t` in `secs`.
    pub(crate) fn record_fetch(&mut self, t: Tier, secs: f64) {
        if let Some(c) = self.tier_mut(t) {
            c.block_secs.add(secs);
        }
    }

    pub(crate) fn recompute_block_secs(&self) -> Option<f64> {
        self.prefill_tps
            .get()
            .filter(|&tps| tps > 0.0)
            .map(|tps| self.block_tokens as f64 / tps)
    }

    /// Whether to fetch a block cached in `t` rather than recompute it.
    pub(crate) fn fetch(&self, t: Tier) -> bool {
        if t == Tier::Device || self.policy == FetchPolicy::Always {
            return true;
        }
        match (
            self.tier(t).and_then(|c| c.block_secs.get()),
            self.recompute_block_secs(),
        ) {
            (Some(f), Some(r)) => f < r,
            _ => true, // not measured yet: fetching is how it gets measured
        }
    }

    pub(crate) fn report(&self, t: Tier) -> TierCostReport {
        let c = self.tier(t).copied().unwrap_or_default();
        let fetch = c.block_secs.get();
        TierCostReport {
            read_bytes_per_s: fetch
                .filter(|&s| s > 0.0)
                .map(|s| self.block_bytes as f64 / s),
            read_latency_s: c.latency_secs.get(),
            fetch_block_s: fetch,
            recompute_block_s: self.recompute_block_secs(),
            fetch_beats_recompute: self.fetch(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_slower_than_recompute_is_not_fetched() {
        let mut m = CostModel::new(FetchPolicy::CostModel, 16, 1 << 20);
        assert!(m.fetch(Tier::Disk), "unmeasured: try it");
        m.record_prefill(1600, 1.0); // 1,600 tok/s: 10 ms per 16-token block
        m.record_fetch(Tier::Host, 0.001);
        m.record_fetch(Tier::Disk, 0.050);
        assert!(m.fetch(Tier::Host));
        assert!(!m.fetch(Tier::Disk));
        assert!(!m.report(Tier::Disk).fetch_beats_recompute);
        let r = m.report(Tier::Host);
        assert_eq!(r.read_bytes_per_s, Some(f64::from(1 << 20) / 0.001));
        assert_eq!(r.recompute_block_s, Some(0.01));
        m.policy = FetchPolicy::Always;
        assert!(m.fetch(Tier::Disk));
    }
}
