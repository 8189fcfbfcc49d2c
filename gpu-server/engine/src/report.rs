//! What the engine publishes about itself: load and cache counters for `/metrics` and the
//! debug endpoint, and a stream of residency updates for the control-plane reporter.
//!
//! The updates follow the `kvmesh.v1` `ReplicaReport` events (load, residency deltas with a
//! sequence number, a snapshot on (re)subscription, cleared) without depending on the proto
//! types, so any transport can map them one to one.

use kvmesh_gpu_server_kv::{CacheStats, Tier};
use serde::Serialize;

/// The replica's load: what a router needs to weigh this replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    pub waiting: u32,
    pub running: u32,
    pub queued_prefill_tokens: u64,
    pub used_blocks: u64,
    pub capacity_blocks: u64,
}

/// One message for a state subscriber.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum StateUpdate {
    Load(LoadReport),
    /// Chunks added to / removed from a tier since the previous residency message.
    Delta {
        seq: u64,
        tier: Tier,
        added: Vec<u64>,
        removed: Vec<u64>,
    },
    /// Everything resident; sent first to every new subscriber.
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
    pub cancelled: u64,
    pub block_tokens: usize,
    pub pool_bytes: usize,
    pub pool_bytes_per_token: usize,
}
