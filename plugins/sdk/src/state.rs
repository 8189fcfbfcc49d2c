//! The Envoy shared-data layout between the state pump and the filters.
//!
//! Shared data is one mutex-ed map per `vm_id`, and a read copies the value,
//! so a filter must not read much per request. For a pool `P`:
//!
//! | key | value | read |
//! | --- | --- | --- |
//! | `kvmesh.v1/P/head` | [`proto::StateHead`] (a few bytes) | every request |
//! | `kvmesh.v1/P/delta/<seq % ring>` | [`proto::PoolDelta`] | once per new delta |
//! | `kvmesh.v1/P/snapshot` | [`proto::PoolSnapshot`] | at start, after a gap, on a new epoch |
//! | `kvmesh.v1/P/placements` | [`crate::board::Board`] (at most ~6 KB) | every request; written by the filters |
//!
//! The writer ([`StateWriter`]) writes deltas first, the snapshot when due,
//! and the head last, so a reader that sees a head finds everything it names
//! (or a newer snapshot). A reader ([`StateReader`]) applies only the deltas
//! it has not seen to its own [`Snapshot`], and reloads the snapshot when a
//! delta it needs was overwritten or the writer restarted (new epoch).

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use crate::proto::{self, Tier};
use crate::snapshot::{ChunkMap, DEVICE, DISK, HOST, Snapshot, tier_bit};

/// Deltas kept in the ring by default.
pub const DEFAULT_RING: u32 = 64;
/// A snapshot is written after this many deltas by default (must be < ring).
pub const DEFAULT_SNAPSHOT_EVERY: u32 = 32;

/// Key of a pool's head.
pub fn head_key(pool: &str) -> String {
    format!("kvmesh.v1/{pool}/head")
}

/// Key of a pool's snapshot.
pub fn snapshot_key(pool: &str) -> String {
    format!("kvmesh.v1/{pool}/snapshot")
}

/// Key of a pool's placement board, written by the filters themselves.
pub fn board_key(pool: &str) -> String {
    format!("kvmesh.v1/{pool}/placements")
}

/// Key of the ring slot that holds delta `seq`.
pub fn delta_key(pool: &str, seq: u64, ring: u32) -> String {
    format!("kvmesh.v1/{pool}/delta/{}", seq % u64::from(ring.max(1)))
}

/// Errors reading the layout.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A value did not decode.
    #[error("undecodable {what}: {source}")]
    Decode {
        /// Which key kind.
        what: &'static str,
        /// The decoder's error.
        source: prost::DecodeError,
    },
    /// The head names a snapshot that is not there.
    #[error("snapshot missing for head at seq {0}")]
    MissingSnapshot(u64),
}

/// What a [`StateReader::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// No head yet (nothing written), or nothing new.
    Unchanged,
    /// Applied this many new deltas.
    Deltas(u64),
    /// Reloaded the whole snapshot (then applied newer deltas).
    Reloaded,
}

/// Keeps a filter's [`Snapshot`] in step with the shared data.
#[derive(Debug, Clone)]
pub struct StateReader {
    pool: String,
    head_key: String,
    epoch: u64,
    seq: u64,
    synced: bool,
    snapshot: Snapshot,
}

impl StateReader {
    /// A reader for `pool` that starts from `initial` (a static snapshot from
    /// the plugin configuration, or an empty one). The first head it sees
    /// replaces it.
    pub fn new(pool: &str, initial: Snapshot) -> Self {
        Self {
            pool: pool.to_owned(),
            head_key: head_key(pool),
            epoch: 0,
            seq: 0,
            synced: false,
            snapshot: initial,
        }
    }

    /// The current view.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Sequence number of the last delta applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Brings the view up to date. `get` reads one shared-data key.
    pub fn refresh(
        &mut self,
        mut get: impl FnMut(&str) -> Option<Vec<u8>>,
    ) -> Result<Refresh, StateError> {
        let Some(raw) = get(&self.head_key) else {
            return Ok(Refresh::Unchanged);
        };
        let head =
            proto::StateHead::decode(raw.as_slice()).map_err(|source| StateError::Decode {
                what: "head",
                source,
            })?;
        if self.synced && head.epoch == self.epoch && head.seq == self.seq {
            return Ok(Refresh::Unchanged);
        }
        let in_ring = self.synced
            && head.epoch == self.epoch
            && self.seq + 1 >= head.oldest_delta_seq
            && self.seq <= head.seq;
        if in_ring {
            // `None`: a delta was overwritten meanwhile; reload below.
            if let Some(n) = self.apply_deltas(&head, &mut get)? {
                return Ok(Refresh::Deltas(n));
            }
        }
        self.reload(&head, &mut get)?;
        Ok(Refresh::Reloaded)
    }

    /// Applies deltas `self.seq+1 ..= head.seq`; `None` if one is missing.
    fn apply_deltas(
        &mut self,
        head: &proto::StateHead,
        get: &mut impl FnMut(&str) -> Option<Vec<u8>>,
    ) -> Result<Option<u64>, StateError> {
        let mut applied = 0;
        while self.seq < head.seq {
            let want = self.seq + 1;
            let Some(raw) = get(&delta_key(&self.pool, want, head.ring)) else {
                return Ok(None);
            };
            let delta =
                proto::PoolDelta::decode(raw.as_slice()).map_err(|source| StateError::Decode {
                    what: "delta",
                    source,
                })?;
            if delta.seq != want || delta.epoch != head.epoch {
                return Ok(None);
            }
            self.snapshot.apply_delta(&delta);
            self.seq = want;
            applied += 1;
        }
        Ok(Some(applied))
    }

    fn reload(
        &mut self,
        head: &proto::StateHead,
        get: &mut impl FnMut(&str) -> Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        let raw = get(&snapshot_key(&self.pool)).ok_or(StateError::MissingSnapshot(head.seq))?;
        let snap =
            proto::PoolSnapshot::decode(raw.as_slice()).map_err(|source| StateError::Decode {
                what: "snapshot",
                source,
            })?;
        self.snapshot = Snapshot::from_proto(&snap);
        self.epoch = snap.epoch;
        self.seq = snap.seq;
        self.synced = true;
        if snap.epoch == head.epoch && snap.seq < head.seq {
            // Deltas newer than the snapshot; if the ring lost one, the next
            // snapshot (written within `snapshot_every` deltas) catches up.
            let _ = self.apply_deltas(head, get)?;
        }
        Ok(())
    }
}

/// One replica's residency as the writer keeps it.
#[derive(Debug, Clone, Default)]
struct ReplicaShards {
    /// shard -> chunk -> tier bits.
    shards: HashMap<u32, ChunkMap<u8>>,
    /// This replica's `ReplicaResidency`, encoded, while its shards are
    /// unchanged: a snapshot re-encodes only the replicas that changed, so
    /// writing one stays cheap when a pool holds millions of chunks.
    encoded: Option<Vec<u8>>,
}

impl ReplicaShards {
    fn message(&self, id: &str) -> proto::ReplicaResidency {
        let mut tiers: [Vec<u64>; 3] = Default::default();
        for chunks in self.shards.values() {
            for (&c, &bits) in chunks {
                for (i, bit) in [DEVICE, HOST, DISK].into_iter().enumerate() {
                    if bits & bit != 0 {
                        tiers[i].push(c);
                    }
                }
            }
        }
        proto::ReplicaResidency {
            replica_id: id.to_owned(),
            resident: tier_chunks(tiers),
        }
    }
}

/// Field number of `PoolSnapshot.residency` (state.proto): the last field, so
/// appending its entries to the encoding of the other fields is exactly what
/// prost writes for the whole message.
const SNAPSHOT_RESIDENCY_FIELD: u32 = 6;

/// Turns pool and residency updates into shared-data writes. Used by the state
/// pump (from delta-xDS resources) and by the host's simulator.
#[derive(Debug, Clone)]
pub struct StateWriter {
    pool: String,
    epoch: u64,
    seq: u64,
    ring: u32,
    snapshot_every: u32,
    since_snapshot: u32,
    model: String,
    chunk_bytes: u32,
    replicas: BTreeMap<String, proto::ReplicaInfo>,
    /// replica -> its shards and their snapshot encoding.
    residency: BTreeMap<String, ReplicaShards>,
    pending: proto::PoolDelta,
    pending_residency: BTreeMap<String, proto::ResidencyChange>,
}

impl StateWriter {
    /// A writer for `pool`. `epoch` must differ from any earlier writer's for
    /// the same shared data (a start time or a random number).
    pub fn new(pool: &str, epoch: u64) -> Self {
        Self {
            pool: pool.to_owned(),
            epoch,
            seq: 0,
            ring: DEFAULT_RING,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            since_snapshot: 0,
            model: String::new(),
            chunk_bytes: crate::chunk::DEFAULT_CHUNK_BYTES,
            replicas: BTreeMap::new(),
            residency: BTreeMap::new(),
            pending: proto::PoolDelta::default(),
            pending_residency: BTreeMap::new(),
        }
    }

    /// Sets the ring size and snapshot cadence (`snapshot_every < ring`).
    pub fn with_ring(mut self, ring: u32, snapshot_every: u32) -> Self {
        self.ring = ring.max(2);
        self.snapshot_every = snapshot_every.clamp(1, self.ring - 1);
        self
    }

    /// The pool this writer serves.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Replaces members and loads of the pool.
    pub fn set_pool_state(&mut self, state: &proto::PoolState) {
        if self.model != state.model || self.chunk_bytes != state.chunk_bytes {
            self.model.clone_from(&state.model);
            self.chunk_bytes = state.chunk_bytes;
            // Chunk identities changed: force readers onto a new snapshot.
            self.since_snapshot = self.snapshot_every;
        }
        let next: BTreeMap<&str, &proto::ReplicaInfo> =
            state.replicas.iter().map(|r| (r.id.as_str(), r)).collect();
        let gone: Vec<String> = self
            .replicas
            .keys()
            .filter(|id| !next.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.remove_replica(&id);
        }
        for (id, info) in next {
            if self.replicas.get(id) != Some(info) {
                let joined = self.replicas.insert(id.to_owned(), info.clone()).is_none();
                self.pending.upserted.retain(|r| r.id != id);
                // A removal earlier in this window stays: readers apply
                // removals before upserts, so they start it afresh.
                self.pending.upserted.push(info.clone());
                if joined {
                    self.publish_all_residency(id);
                }
            }
        }
    }

    /// Readers drop a replica's residency with the replica; when it (re)joins
    /// they get everything it holds again.
    fn publish_all_residency(&mut self, id: &str) {
        let Some(held) = self.residency.get(id) else {
            return;
        };
        let empty = ChunkMap::default();
        let change = self
            .pending_residency
            .entry(id.to_owned())
            .or_insert_with(|| proto::ResidencyChange {
                replica_id: id.to_owned(),
                ..Default::default()
            });
        for chunks in held.shards.values() {
            diff_into(&empty, chunks, change);
        }
    }

    /// The replica leaves; its shards stay (the control plane removes them
    /// separately) but are published only while it is a member.
    fn remove_replica(&mut self, id: &str) {
        self.replicas.remove(id);
        self.pending.upserted.retain(|r| r.id != id);
        self.pending_residency.remove(id);
        if !self.pending.removed.iter().any(|r| r == id) {
            self.pending.removed.push(id.to_owned());
        }
    }

    /// Replaces one residency shard of one replica; records what changed.
    pub fn set_shard(&mut self, shard: &proto::ResidencyShard) {
        let mut next: ChunkMap<u8> = ChunkMap::default();
        for tc in &shard.resident {
            if let Some(bit) = tier_bit(tc.tier) {
                for &c in &tc.chunks {
                    *next.entry(c).or_default() |= bit;
                }
            }
        }
        let held = self.residency.entry(shard.replica_id.clone()).or_default();
        held.encoded = None;
        let prev = held.shards.remove(&shard.shard).unwrap_or_default();
        if self.replicas.contains_key(&shard.replica_id) {
            let change = self
                .pending_residency
                .entry(shard.replica_id.clone())
                .or_insert_with(|| proto::ResidencyChange {
                    replica_id: shard.replica_id.clone(),
                    ..Default::default()
                });
            diff_into(&prev, &next, change);
        }
        if !next.is_empty() {
            held.shards.insert(shard.shard, next);
        } else if held.shards.is_empty() {
            self.residency.remove(&shard.replica_id);
        }
    }

    /// Drops one residency shard (its resource was removed).
    pub fn remove_shard(&mut self, replica_id: &str, shard: u32) {
        self.set_shard(&proto::ResidencyShard {
            pool: self.pool.clone(),
            replica_id: replica_id.to_owned(),
            shard,
            shard_count: 0,
            resident: Vec::new(),
        });
    }

    /// Whether anything changed since the last flush.
    pub fn is_dirty(&self) -> bool {
        !self.pending.upserted.is_empty()
            || !self.pending.removed.is_empty()
            || self
                .pending_residency
                .values()
                .any(|c| !c.added.is_empty() || !c.removed.is_empty())
            || self.seq == 0
    }

    /// The writes that publish everything changed since the last flush, in the
    /// order they must be written (head last). Empty when nothing changed.
    pub fn flush(&mut self) -> Vec<(String, Vec<u8>)> {
        if !self.is_dirty() {
            return Vec::new();
        }
        self.seq += 1;
        let mut delta = std::mem::take(&mut self.pending);
        delta.epoch = self.epoch;
        delta.seq = self.seq;
        delta.residency = std::mem::take(&mut self.pending_residency)
            .into_values()
            .filter(|c| !c.added.is_empty() || !c.removed.is_empty())
            .collect();
        let mut writes = vec![(
            delta_key(&self.pool, self.seq, self.ring),
            delta.encode_to_vec(),
        )];
        self.since_snapshot += 1;
        let first = self.seq == 1;
        if first || self.since_snapshot >= self.snapshot_every {
            writes.push((snapshot_key(&self.pool), self.encoded_snapshot()));
            self.since_snapshot = 0;
        }
        let snapshot_seq = self.seq - u64::from(self.since_snapshot);
        let head = proto::StateHead {
            epoch: self.epoch,
            seq: self.seq,
            snapshot_seq,
            oldest_delta_seq: self.seq.saturating_sub(u64::from(self.ring) - 1).max(1),
            ring: self.ring,
        };
        writes.push((head_key(&self.pool), head.encode_to_vec()));
        writes
    }

    /// The whole current state as a snapshot message.
    pub fn snapshot(&self) -> proto::PoolSnapshot {
        let mut msg = self.snapshot_head();
        msg.residency = self
            .residency
            .iter()
            .filter(|(id, _)| self.replicas.contains_key(*id))
            .map(|(id, held)| held.message(id))
            .collect();
        msg
    }

    /// [`snapshot`](Self::snapshot) encoded, byte for byte, re-encoding only
    /// the residency of replicas whose shards changed since the last call.
    pub fn encoded_snapshot(&mut self) -> Vec<u8> {
        let mut buf = self.snapshot_head().encode_to_vec();
        for (id, held) in &mut self.residency {
            if !self.replicas.contains_key(id) {
                continue;
            }
            if held.encoded.is_none() {
                held.encoded = Some(held.message(id).encode_to_vec());
            }
            let body = held.encoded.as_deref().unwrap_or_default();
            prost::encoding::encode_key(
                SNAPSHOT_RESIDENCY_FIELD,
                prost::encoding::WireType::LengthDelimited,
                &mut buf,
            );
            prost::encoding::encode_varint(body.len() as u64, &mut buf);
            buf.extend_from_slice(body);
        }
        buf
    }

    /// Everything of a snapshot but its residency.
    fn snapshot_head(&self) -> proto::PoolSnapshot {
        proto::PoolSnapshot {
            epoch: self.epoch,
            seq: self.seq,
            model: self.model.clone(),
            chunk_bytes: self.chunk_bytes,
            replicas: self.replicas.values().cloned().collect(),
            residency: Vec::new(),
        }
    }
}

fn tier_chunks(tiers: [Vec<u64>; 3]) -> Vec<proto::TierChunks> {
    [Tier::Device, Tier::Host, Tier::Disk]
        .into_iter()
        .zip(tiers)
        .filter(|(_, c)| !c.is_empty())
        .map(|(tier, mut chunks)| {
            chunks.sort_unstable();
            proto::TierChunks {
                tier: tier as i32,
                chunks,
            }
        })
        .collect()
}

/// Adds the per-tier difference between `prev` and `next` to `change`,
/// cancelling against what `change` already holds from earlier updates.
fn diff_into(prev: &ChunkMap<u8>, next: &ChunkMap<u8>, change: &mut proto::ResidencyChange) {
    let mut added: [Vec<u64>; 3] = Default::default();
    let mut removed: [Vec<u64>; 3] = Default::default();
    for (&c, &bits) in next {
        let old = prev.get(&c).copied().unwrap_or(0);
        for (i, bit) in [DEVICE, HOST, DISK].into_iter().enumerate() {
            if bits & bit != 0 && old & bit == 0 {
                added[i].push(c);
            }
        }
    }
    for (&c, &old) in prev {
        let bits = next.get(&c).copied().unwrap_or(0);
        for (i, bit) in [DEVICE, HOST, DISK].into_iter().enumerate() {
            if old & bit != 0 && bits & bit == 0 {
                removed[i].push(c);
            }
        }
    }
    merge_tier_lists(&mut change.added, &mut change.removed, added, removed);
}

/// Folds new additions and removals into pending lists: an addition cancels a
/// pending removal of the same chunk and tier, and the other way round.
fn merge_tier_lists(
    pending_added: &mut Vec<proto::TierChunks>,
    pending_removed: &mut Vec<proto::TierChunks>,
    added: [Vec<u64>; 3],
    removed: [Vec<u64>; 3],
) {
    let tiers = [Tier::Device, Tier::Host, Tier::Disk];
    for (i, tier) in tiers.into_iter().enumerate() {
        apply_side(pending_added, pending_removed, tier, &added[i]);
        apply_side(pending_removed, pending_added, tier, &removed[i]);
    }
    pending_added.retain(|t| !t.chunks.is_empty());
    pending_removed.retain(|t| !t.chunks.is_empty());
}

fn apply_side(
    into: &mut Vec<proto::TierChunks>,
    opposite: &mut [proto::TierChunks],
    tier: Tier,
    chunks: &[u64],
) {
    if chunks.is_empty() {
        return;
    }
    let mut fresh: Vec<u64> = chunks.to_vec();
    if let Some(opp) = opposite.iter_mut().find(|t| t.tier == tier as i32) {
        let cancel: std::collections::HashSet<u64> = fresh.iter().copied().collect();
        let before = opp.chunks.len();
        let cancelled: std::collections::HashSet<u64> = opp
            .chunks
            .iter()
            .copied()
            .filter(|c| cancel.contains(c))
            .collect();
        opp.chunks.retain(|c| !cancelled.contains(c));
        if opp.chunks.len() != before {
            fresh.retain(|c| !cancelled.contains(c));
        }
    }
    match into.iter_mut().find(|t| t.tier == tier as i32) {
        Some(t) => t.chunks.extend(fresh),
        None => into.push(proto::TierChunks {
            tier: tier as i32,
            chunks: fresh,
        }),
    }
}

#[cfg(test)]
mod tests;
