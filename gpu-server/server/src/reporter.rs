//! Streams the engine's state to the kvmesh control plane over `kvmesh.v1` `ReplicaState`.
//!
//! The engine publishes [`StateUpdate`]s (load, residency deltas and snapshots per tier,
//! cleared); this module maps each one onto the control plane's [`Reporter`], which owns the
//! gRPC stream, registers, reconnects with backoff and answers resyncs from its own mirror of
//! what is resident. The engine is subscribed to once, so its first message (a snapshot of
//! each tier) is what this replica holds when reporting starts.

use kvmesh_control_plane_api::{ConnState, Reporter, ReporterConfig};
use kvmesh_gpu_server_engine::{EngineHandle, LoadReport, StateUpdate};
use kvmesh_gpu_server_kv::Tier;
use kvmesh_plugins_sdk::proto::{self, Load, Register, TierChunks, TierUsage};
use tokio::sync::watch;

/// Where to report and who this replica is.
#[derive(Debug, Clone)]
pub struct ReportTarget {
    /// `ReplicaState` endpoint, e.g. `http://127.0.0.1:18000`.
    pub endpoint: String,
    pub replica_id: String,
    /// `host:port` the gateway sends requests to.
    pub address: String,
    /// Model name; the control plane puts the replica in the pool serving it.
    pub model: String,
    pub chunk_bytes: u32,
}

/// The running adapter; dropping it closes the stream (the replica leaves EDS after the
/// control plane's silence timeout).
#[derive(Debug)]
pub struct StateReporter {
    state: watch::Receiver<ConnState>,
    task: tokio::task::JoinHandle<()>,
}

impl StateReporter {
    /// Subscribes to the engine and starts streaming. Needs a tokio runtime.
    pub fn spawn(engine: &EngineHandle, target: ReportTarget) -> Self {
        let cfg = engine.config();
        let register = Register {
            replica_id: target.replica_id,
            address: target.address,
            model: target.model,
            block_tokens: u32::try_from(cfg.block_tokens).unwrap_or(u32::MAX),
            chunk_bytes: target.chunk_bytes,
            capacity: vec![TierUsage {
                tier: proto::Tier::Device as i32,
                used_blocks: 0,
                capacity_blocks: cfg.num_blocks as u64,
            }],
        };
        let reporter = Reporter::spawn(ReporterConfig::new(target.endpoint, register));
        let state = reporter.state();
        let mut updates = engine.subscribe();
        let task = tokio::spawn(async move {
            while let Some(update) = updates.recv().await {
                forward(&reporter, update);
            }
        });
        Self { state, task }
    }

    /// The stream's state (tests wait for `Registered`).
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }
}

impl Drop for StateReporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn forward(reporter: &Reporter, update: StateUpdate) {
    match update {
        StateUpdate::Load(load) => reporter.load(load_proto(&load)),
        StateUpdate::Delta {
            tier,
            added,
            removed,
            ..
        } => reporter.residency(one_tier(tier, added), one_tier(tier, removed)),
        // Only the first message of the one subscription: everything held at start.
        StateUpdate::Snapshot { tier, resident, .. } => {
            reporter.residency(one_tier(tier, resident), Vec::new());
        }
        StateUpdate::Cleared { .. } => reporter.cleared(),
    }
}

fn one_tier(tier: Tier, chunks: Vec<u64>) -> Vec<TierChunks> {
    vec![TierChunks {
        tier: tier_proto(tier) as i32,
        chunks,
    }]
}

pub fn tier_proto(tier: Tier) -> proto::Tier {
    match tier {
        Tier::Device => proto::Tier::Device,
        Tier::Host => proto::Tier::Host,
        Tier::Disk => proto::Tier::Disk,
    }
}

fn load_proto(load: &LoadReport) -> Load {
    Load {
        waiting: load.waiting,
        running: load.running,
        queued_prefill_tokens: load.queued_prefill_tokens,
        kv: vec![TierUsage {
            tier: proto::Tier::Device as i32,
            used_blocks: load.used_blocks,
            capacity_blocks: load.capacity_blocks,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_maps_field_for_field_with_device_usage() {
        let l = load_proto(&LoadReport {
            waiting: 3,
            running: 2,
            queued_prefill_tokens: 900,
            used_blocks: 10,
            capacity_blocks: 64,
        });
        assert_eq!((l.waiting, l.running, l.queued_prefill_tokens), (3, 2, 900));
        assert_eq!(
            l.kv,
            vec![TierUsage {
                tier: proto::Tier::Device as i32,
                used_blocks: 10,
                capacity_blocks: 64
            }]
        );
    }

    #[test]
    fn every_engine_tier_has_its_own_proto_tier() {
        let all = [Tier::Device, Tier::Host, Tier::Disk].map(tier_proto);
        assert_eq!(
            all,
            [proto::Tier::Device, proto::Tier::Host, proto::Tier::Disk]
        );
    }
}
