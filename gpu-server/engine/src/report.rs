//! What the engine publishes about itself: load and cache counters for `/metrics` and the
//! debug endpoint, and a stream of residency updates for the control-plane reporter.
//!
//! The updates follow the `kvmesh.v1` `ReplicaReport` events (load, residency deltas with a
//! sequence number, a snapshot on (re)subscription, cleared) without depending on the proto
//! types, so any transport can map them one to one.

use kvmesh_gpu_server_kv::{CacheStats, Tier, TierCounters};
use serde::Serialize;

use crate::cost::{FetchPolicy, TierCostReport};
use crate::tiers::{DiskStatus, TierBytes};

/// KV use of one tier (`kvmesh.v1.TierUsage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TierLoad {
    pub tier: Tier,
    pub used_blocks: u64,
    pub capacity_blocks: u64,
}

/// The replica's load: what a router needs to weigh this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    pub waiting: u32,
    pub running: u32,
    pub queued_prefill_tokens: u64,
    /// Device tier blocks used (referenced or cached) and its capacity.
    pub used_blocks: u64,
    pub capacity_blocks: u64,
    /// Every enabled tier, device first.
    pub tiers: Vec<TierLoad>,
}

/// One tier as `/metrics` and the debug endpoint show it.
#[derive(Debug, Clone, Serialize)]
pub struct TierStatus {
    pub tier: Tier,
    pub enabled: bool,
    pub counters: TierCounters,
    pub bytes: TierBytes,
    /// Measured fetch cost and the decision it implies (lower tiers).
    pub cost: TierCostReport,
    /// Resident text-chunk hashes of this tier, sorted. (The blocks themselves:
    /// `EngineHandle::tier_contents`.)
    pub resident_chunks: Vec<u64>,
}

/// The cost model's inputs that are not per tier.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct CostStatus {
    pub policy: FetchPolicy,
    /// Measured prefill speed of this model on this machine.
    pub recompute_tokens_per_s: Option<f64>,
    pub block_bytes: usize,
}

/// One message for a state subscriber.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum StateUpdate {
    Load(LoadReport),
    /// Chunks added to / removed from one tier since the previous residency message. A block
    /// that moves between tiers in one engine step yields one delta per tier, sent back to
    /// back (device, host, disk order).
    Delta {
        seq: u64,
        tier: Tier,
        added: Vec<u64>,
        removed: Vec<u64>,
    },
    /// Everything resident in one tier; a new subscriber first gets one per enabled tier
    /// (device, host, disk), all with the same `seq`.
    Snapshot {
        seq: u64,
        tier: Tier,
        resident: Vec<u64>,
    },
    Cleared {
        seq: u64,
    },
}

/// A point-in-time view of the engine, refreshed after every step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub load: LoadReport,
    pub cache: CacheStats,
    /// Residency sequence number of the last delta.
    pub residency_seq: u64,
    /// Resident text-chunk hashes (device tier), sorted.
    pub resident_chunks: Vec<u64>,
    pub steps: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Requests held back at admission (once each) while a running sequence prefilled blocks
    /// of their prefix.
    pub prefix_waits: u64,
    pub cancelled: u64,
    pub block_tokens: usize,
    pub pool_bytes: usize,
    pub pool_bytes_per_token: usize,
    /// Every tier, device first (disabled ones too, with `enabled: false`).
    pub tiers: Vec<TierStatus>,
    pub cost: CostStatus,
    pub disk: DiskStatus,
}
