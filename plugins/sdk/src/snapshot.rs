//! The view of one pool that a policy decides on: its replicas, their load,
//! and which replica holds which chunk in which tier.
//!
//! Replicas live in slots; a [`ReplicaRef`] names a slot and the generation of
//! the replica in it, so a reference to a removed replica never resolves to
//! whoever takes the slot next. The residency index maps a chunk hash to the
//! replicas holding it, with a bit per tier.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::xxh3_64;

use crate::proto::{self, Tier};

/// A replica in a [`Snapshot`]; stays valid only while that replica is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicaRef {
    slot: u32,
    generation: u32,
}

impl ReplicaRef {
    /// The slot index (dense, small; usable as a vector index).
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

/// One replica as the policies see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Stable identity (what the model server registered).
    pub id: String,
    /// `host:port` the gateway sends to; what the endpoint header carries.
    pub address: String,
    /// Latest reported load.
    pub load: proto::Load,
    /// Hash of `id`: the same on every worker VM, for rendezvous hashing.
    pub key: u64,
    /// Bumps whenever `load` is replaced by a new report.
    pub load_version: u64,
}

/// Tier bits in a [`Holder`].
pub const DEVICE: u8 = 1 << 0;
/// Host DRAM tier bit.
pub const HOST: u8 = 1 << 1;
/// Disk tier bit.
pub const DISK: u8 = 1 << 2;

/// The bit of a tier, or `None` for `TIER_UNSPECIFIED` and unknown values.
pub fn tier_bit(tier: i32) -> Option<u8> {
    match Tier::try_from(tier).ok()? {
        Tier::Device => Some(DEVICE),
        Tier::Host => Some(HOST),
        Tier::Disk => Some(DISK),
        Tier::Unspecified => None,
    }
}

/// A replica holding a chunk, and in which tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Slot of the replica.
    pub slot: u32,
    /// Tier bits ([`DEVICE`], [`HOST`], [`DISK`]).
    pub tiers: u8,
}

/// The holders of one chunk. Nearly every chunk has one, kept inline so a
/// pool of millions of chunks is not millions of allocations.
#[derive(Debug, Clone)]
enum Holders {
    One(Holder),
    Many(Vec<Holder>),
}

impl Holders {
    fn as_slice(&self) -> &[Holder] {
        match self {
            Holders::One(h) => std::slice::from_ref(h),
            Holders::Many(v) => v,
        }
    }

    /// Adds tier bits for `slot`; true when `slot` did not hold the chunk.
    fn add(&mut self, slot: u32, bit: u8) -> bool {
        match self {
            Holders::One(h) if h.slot == slot => {
                h.tiers |= bit;
                false
            }
            Holders::One(h) => {
                *self = Holders::Many(vec![*h, Holder { slot, tiers: bit }]);
                true
            }
            Holders::Many(v) => match v.iter_mut().find(|h| h.slot == slot) {
                Some(h) => {
                    h.tiers |= bit;
                    false
                }
                None => {
                    v.push(Holder { slot, tiers: bit });
                    true
                }
            },
        }
    }

    /// Clears tier bits of `slot` (all of them for `!0`). Returns whether no
    /// replica holds the chunk any more, and whether `slot` stopped holding it.
    fn clear(&mut self, slot: u32, bits: u8) -> (bool, bool) {
        match self {
            Holders::One(h) => {
                let dropped = h.slot == slot && h.tiers != 0 && h.tiers & !bits == 0;
                if h.slot == slot {
                    h.tiers &= !bits;
                }
                (h.tiers == 0, dropped)
            }
            Holders::Many(v) => {
                let mut dropped = false;
                for h in v.iter_mut().filter(|h| h.slot == slot) {
                    dropped |= h.tiers != 0 && h.tiers & !bits == 0;
                    h.tiers &= !bits;
                }
                v.retain(|h| h.tiers != 0);
                if let [only] = v.as_slice() {
                    *self = Holders::One(*only);
                    return (false, dropped);
                }
                (v.is_empty(), dropped)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    generation: u32,
    replica: Option<Replica>,
    /// Distinct chunks the replica holds, in any tier.
    resident: u64,
}

/// Hasher for chunk-hash keys: one folded 128-bit multiply. Real chunk hashes
/// are already uniform, but the map must not depend on it: hashbrown takes its
/// probe tag from the top bits and its bucket from the low bits, so keys that
/// share either (sequential test ids, structured fake replicas) made an
/// identity hash degrade to scanning whole groups (a 64 x 10,000-chunk reload
/// took 9.8 s instead of milliseconds).
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkKeyHasher(u64);

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for ChunkKeyHasher {
    fn finish(&self) -> u64 {
        let full = u128::from(self.0) * u128::from(MIX);
        (full as u64) ^ ((full >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// A `HashMap` keyed by chunk hash.
pub type ChunkMap<V> = HashMap<u64, V, BuildHasherDefault<ChunkKeyHasher>>;

/// One pool's replicas, loads and residency.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    model: String,
    chunk_bytes: u32,
    slots: Vec<Slot>,
    by_id: HashMap<String, u32>,
    index: ChunkMap<Holders>,
}

impl Snapshot {
    /// An empty pool.
    pub fn new(model: impl Into<String>, chunk_bytes: u32) -> Self {
        Self {
            model: model.into(),
            chunk_bytes,
            ..Self::default()
        }
    }

    /// Builds the view from a full snapshot message.
    pub fn from_proto(msg: &proto::PoolSnapshot) -> Self {
        let mut s = Self::new(msg.model.clone(), msg.chunk_bytes);
        for r in &msg.replicas {
            s.upsert(r);
        }
        for res in &msg.residency {
            for tc in &res.resident {
                s.add_resident(&res.replica_id, tc.tier, &tc.chunks);
            }
        }
        s
    }

    /// The full state as a message (for snapshots and tests).
    pub fn to_proto(&self) -> proto::PoolSnapshot {
        let mut residency: Vec<(u32, [Vec<u64>; 3])> = Vec::new();
        let mut per_slot: HashMap<u32, usize> = HashMap::new();
        for (chunk, holders) in &self.index {
            for h in holders.as_slice() {
                let at = *per_slot.entry(h.slot).or_insert_with(|| {
                    residency.push((h.slot, Default::default()));
                    residency.len() - 1
                });
                for (i, bit) in [DEVICE, HOST, DISK].into_iter().enumerate() {
                    if h.tiers & bit != 0 {
                        residency[at].1[i].push(*chunk);
                    }
                }
            }
        }
        residency.sort_by_key(|(slot, _)| *slot);
        proto::PoolSnapshot {
            epoch: 0,
            seq: 0,
            model: self.model.clone(),
            chunk_bytes: self.chunk_bytes,
            replicas: self
                .replicas()
                .map(|(_, r)| proto::ReplicaInfo {
                    id: r.id.clone(),
                    address: r.address.clone(),
                    load: Some(r.load.clone()),
                })
                .collect(),
            residency: residency
                .into_iter()
                .filter_map(|(slot, mut tiers)| {
                    let id = self.slots.get(slot as usize)?.replica.as_ref()?.id.clone();
                    let resident = [Tier::Device, Tier::Host, Tier::Disk]
                        .into_iter()
                        .zip(tiers.iter_mut())
                        .filter(|(_, c)| !c.is_empty())
                        .map(|(tier, chunks)| {
                            chunks.sort_unstable();
                            proto::TierChunks {
                                tier: tier as i32,
                                chunks: std::mem::take(chunks),
                            }
                        })
                        .collect();
                    Some(proto::ReplicaResidency {
                        replica_id: id,
                        resident,
                    })
                })
                .collect(),
        }
    }

    /// The model whose chain the chunk hashes belong to.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Text chunk size of the pool.
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Sets model and chunk size (from a newer pool message).
    pub fn set_pool(&mut self, model: &str, chunk_bytes: u32) {
        if self.model != model || self.chunk_bytes != chunk_bytes {
            self.model = model.to_owned();
            self.chunk_bytes = chunk_bytes;
            self.index.clear();
            for s in &mut self.slots {
                s.resident = 0;
            }
        }
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// No replicas at all.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Upper bound (exclusive) of the slot indices in use, for sizing vectors.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Live replicas in slot order.
    pub fn replicas(&self) -> impl Iterator<Item = (ReplicaRef, &Replica)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let r = s.replica.as_ref()?;
            Some((
                ReplicaRef {
                    slot: i as u32,
                    generation: s.generation,
                },
                r,
            ))
        })
    }

    /// The replica a reference names, if it is still there.
    pub fn get(&self, r: ReplicaRef) -> Option<&Replica> {
        let s = self.slots.get(r.slot as usize)?;
        (s.generation == r.generation)
            .then_some(s.replica.as_ref())
            .flatten()
    }

    /// The live replica in a slot.
    pub fn at_slot(&self, slot: u32) -> Option<(ReplicaRef, &Replica)> {
        let s = self.slots.get(slot as usize)?;
        let r = s.replica.as_ref()?;
        Some((
            ReplicaRef {
                slot,
                generation: s.generation,
            },
            r,
        ))
    }

    /// The replica with this id.
    pub fn find(&self, id: &str) -> Option<(ReplicaRef, &Replica)> {
        self.at_slot(*self.by_id.get(id)?)
    }

    /// Replicas holding `chunk`.
    pub fn holders(&self, chunk: u64) -> &[Holder] {
        self.index.get(&chunk).map_or(&[], Holders::as_slice)
    }

    /// Distinct chunks replica `r` reports holding, in any tier (0 for a
    /// replica that is gone).
    pub fn resident_chunks(&self, r: ReplicaRef) -> u64 {
        self.get(r)
            .map_or(0, |_| self.slots[r.slot as usize].resident)
    }

    /// Number of distinct chunks held by any replica.
    pub fn indexed_chunks(&self) -> usize {
        self.index.len()
    }

    /// Adds a replica or replaces its address and load.
    pub fn upsert(&mut self, info: &proto::ReplicaInfo) {
        let load = info.load.clone().unwrap_or_default();
        if let Some(&slot) = self.by_id.get(&info.id) {
            if let Some(r) = self.slots[slot as usize].replica.as_mut() {
                r.address.clone_from(&info.address);
                r.load = load;
                r.load_version += 1;
            }
            return;
        }
        let replica = Replica {
            id: info.id.clone(),
            address: info.address.clone(),
            load,
            key: xxh3_64(info.id.as_bytes()),
            load_version: 1,
        };
        let slot = match self.slots.iter().position(|s| s.replica.is_none()) {
            Some(free) => {
                let s = &mut self.slots[free];
                s.generation = s.generation.wrapping_add(1);
                // `remove` left its count at 0.
                s.replica = Some(replica);
                free
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    replica: Some(replica),
                    resident: 0,
                });
                self.slots.len() - 1
            }
        };
        self.by_id.insert(info.id.clone(), slot as u32);
    }

    /// Removes a replica and everything it held.
    pub fn remove(&mut self, id: &str) {
        let Some(slot) = self.by_id.remove(id) else {
            return;
        };
        let s = &mut self.slots[slot as usize];
        s.replica = None;
        s.resident = 0;
        self.index.retain(|_, holders| !holders.clear(slot, !0).0);
    }

    /// Marks `chunks` resident on replica `id` in `tier`; unknown replicas and
    /// tiers are ignored.
    pub fn add_resident(&mut self, id: &str, tier: i32, chunks: &[u64]) {
        let (Some(&slot), Some(bit)) = (self.by_id.get(id), tier_bit(tier)) else {
            return;
        };
        self.index.reserve(chunks.len());
        let mut added = 0;
        for &c in chunks {
            match self.index.entry(c) {
                Entry::Occupied(mut e) => added += u64::from(e.get_mut().add(slot, bit)),
                Entry::Vacant(e) => {
                    e.insert(Holders::One(Holder { slot, tiers: bit }));
                    added += 1;
                }
            }
        }
        self.slots[slot as usize].resident += added;
    }

    /// Marks `chunks` no longer resident on replica `id` in `tier`.
    pub fn remove_resident(&mut self, id: &str, tier: i32, chunks: &[u64]) {
        let (Some(&slot), Some(bit)) = (self.by_id.get(id), tier_bit(tier)) else {
            return;
        };
        let mut dropped = 0;
        for c in chunks {
            if let Some(h) = self.index.get_mut(c) {
                let (empty, gone) = h.clear(slot, bit);
                dropped += u64::from(gone);
                if empty {
                    self.index.remove(c);
                }
            }
        }
        let s = &mut self.slots[slot as usize];
        s.resident = s.resident.saturating_sub(dropped);
    }

    /// Applies one delta of the shared-data layout.
    pub fn apply_delta(&mut self, delta: &proto::PoolDelta) {
        for id in &delta.removed {
            self.remove(id);
        }
        for r in &delta.upserted {
            self.upsert(r);
        }
        for change in &delta.residency {
            for tc in &change.removed {
                self.remove_resident(&change.replica_id, tc.tier, &tc.chunks);
            }
            for tc in &change.added {
                self.add_resident(&change.replica_id, tc.tier, &tc.chunks);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, queued: u64) -> proto::ReplicaInfo {
        proto::ReplicaInfo {
            id: id.into(),
            address: format!("{id}:80"),
            load: Some(proto::Load {
                queued_prefill_tokens: queued,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn removed_replica_reference_never_resolves_to_its_successor() {
        let mut s = Snapshot::new("m", 256);
        s.upsert(&info("a", 0));
        let (a, _) = s.find("a").unwrap();
        s.remove("a");
        s.upsert(&info("b", 0));
        let (b, _) = s.find("b").unwrap();
        assert_eq!(a.slot(), b.slot());
        assert!(s.get(a).is_none());
        assert_eq!(s.get(b).unwrap().id, "b");
    }

    #[test]
    fn resident_chunk_counts_follow_adds_removals_and_replicas() {
        let mut s = Snapshot::new("m", 256);
        s.upsert(&info("a", 0));
        s.upsert(&info("b", 0));
        let (a, _) = s.find("a").unwrap();
        let (b, _) = s.find("b").unwrap();
        s.add_resident("a", Tier::Device as i32, &[1, 2, 3]);
        // A chunk in a second tier, or added again, is not counted twice.
        s.add_resident("a", Tier::Host as i32, &[2, 3, 4]);
        s.add_resident("a", Tier::Device as i32, &[1]);
        s.add_resident("b", Tier::Host as i32, &[2]);
        assert_eq!((s.resident_chunks(a), s.resident_chunks(b)), (4, 1));
        // Leaving one tier keeps the chunk; leaving its last tier drops it.
        s.remove_resident("a", Tier::Device as i32, &[2, 1]);
        assert_eq!(s.resident_chunks(a), 3);
        s.remove_resident("a", Tier::Host as i32, &[2, 9]);
        assert_eq!((s.resident_chunks(a), s.resident_chunks(b)), (2, 1));
        // A removed replica holds nothing; its slot's successor starts at 0.
        s.remove("a");
        assert_eq!(s.resident_chunks(a), 0);
        s.upsert(&info("c", 0));
        let (c, _) = s.find("c").unwrap();
        assert_eq!(c.slot(), a.slot());
        assert_eq!(s.resident_chunks(c), 0);
        s.add_resident("c", Tier::Device as i32, &[3]);
        assert_eq!((s.resident_chunks(c), s.resident_chunks(a)), (1, 0));
    }

    #[test]
    fn residency_tiers_and_removal() {
        let mut s = Snapshot::new("m", 256);
        s.upsert(&info("a", 0));
        s.upsert(&info("b", 0));
        s.add_resident("a", Tier::Device as i32, &[1, 2]);
        s.add_resident("a", Tier::Disk as i32, &[2]);
        s.add_resident("b", Tier::Host as i32, &[2]);
        assert_eq!(s.holders(2).len(), 2);
        s.remove_resident("a", Tier::Device as i32, &[2]);
        let a_slot = s.find("a").unwrap().0.slot() as u32;
        assert!(s.holders(2).contains(&Holder {
            slot: a_slot,
            tiers: DISK
        }));
        s.remove("b");
        assert_eq!(
            s.holders(2),
            &[Holder {
                slot: a_slot,
                tiers: DISK
            }]
        );
        s.remove_resident("a", Tier::Disk as i32, &[2]);
        assert!(s.holders(2).is_empty());
        assert_eq!(s.indexed_chunks(), 1);
    }

    #[test]
    fn proto_round_trip() {
        let mut s = Snapshot::new("m", 128);
        s.upsert(&info("a", 7));
        s.upsert(&info("b", 9));
        s.add_resident("a", Tier::Device as i32, &[5, 6]);
        s.add_resident("b", Tier::Host as i32, &[5]);
        let back = Snapshot::from_proto(&s.to_proto());
        assert_eq!(back.to_proto(), s.to_proto());
        assert_eq!(back.find("a").unwrap().1.load.queued_prefill_tokens, 7);
    }
}
