//! Slot bookkeeping of a lower tier (HOST or DISK): which fixed-size slot holds which block
//! hash, the free slots, and the LRU order of the occupied ones.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::chunks::Tier;
use crate::{BlockHash, BlockId};

/// Where a cached block's KV physically is: a block of the device pool or a slot of a lower
/// tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Place {
    Device(BlockId),
    Host(u32),
    Disk(u32),
}

impl Place {
    pub fn tier(self) -> Tier {
        match self {
            Place::Device(_) => Tier::Device,
            Place::Host(_) => Tier::Host,
            Place::Disk(_) => Tier::Disk,
        }
    }
}

/// One whole-block copy that the physical layer must make. Moves are recorded in the order the
/// logical state changed and must be carried out in that order, before the device pool is
/// next written (a freed source may be reused by a later move of the same batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub hash: BlockHash,
    pub parent: Option<BlockHash>,
    pub from: Place,
    pub to: Place,
    /// Text chunks the block holds (written into disk slot headers for warm restart).
    pub chunks: Vec<u64>,
}

/// Counters of one tier, in blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TierCounters {
    pub capacity_blocks: u64,
    pub used_blocks: u64,
    /// Prompt blocks found in this tier at admission.
    pub hits: u64,
    /// Prompt blocks looked up and found neither in this tier nor in a faster one.
    pub misses: u64,
    /// Blocks that left this tier to make room (demoted further down, or dropped).
    pub evictions: u64,
    /// Blocks that arrived in this tier by demotion.
    pub demotions: u64,
    /// Blocks promoted out of this tier into the device tier.
    pub promotions: u64,
    /// Blocks copied into / out of this tier (any direction).
    pub blocks_in: u64,
    pub blocks_out: u64,
}

/// A lower tier's slots.
#[derive(Debug)]
pub(crate) struct Lower {
    cap: usize,
    free: BTreeSet<u32>,
    lru: BTreeSet<(u64, BlockHash)>,
    /// hash -> (slot, last use); a pinned entry is out of the LRU.
    slots: HashMap<BlockHash, (u32, u64)>,
    owner: Vec<Option<BlockHash>>,
    pinned: Option<BlockHash>,
}

impl Lower {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            free: (0..cap as u32).collect(),
            lru: BTreeSet::new(),
            slots: HashMap::new(),
            owner: vec![None; cap],
            pinned: None,
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub(crate) fn slot(&self, h: BlockHash) -> Option<u32> {
        self.slots.get(&h).map(|&(s, _)| s)
    }

    /// The least recently used unpinned entry.
    pub(crate) fn victim(&self) -> Option<BlockHash> {
        self.lru.iter().next().map(|&(_, h)| h)
    }

    /// Puts `h` in the lowest free slot; `None` when full.
    pub(crate) fn insert(&mut self, h: BlockHash, tick: u64) -> Option<u32> {
        let slot = self.free.pop_first()?;
        self.occupy(h, slot, tick);
        Some(slot)
    }

    /// Puts `h` in `slot` if that slot is free (warm restart).
    pub(crate) fn insert_at(&mut self, h: BlockHash, slot: u32, tick: u64) -> bool {
        if self.slots.contains_key(&h) || !self.free.remove(&slot) {
            return false;
        }
        self.occupy(h, slot, tick);
        true
    }

    fn occupy(&mut self, h: BlockHash, slot: u32, tick: u64) {
        self.slots.insert(h, (slot, tick));
        self.lru.insert((tick, h));
        self.owner[slot as usize] = Some(h);
    }

    /// Frees `h`'s slot; returns it.
    pub(crate) fn remove(&mut self, h: BlockHash) -> Option<u32> {
        let (slot, tick) = self.slots.remove(&h)?;
        self.lru.remove(&(tick, h));
        if self.pinned == Some(h) {
            self.pinned = None;
        }
        self.owner[slot as usize] = None;
        self.free.insert(slot);
        Some(slot)
    }

    /// Keeps `h` from being chosen as a victim until [`Lower::unpin`] or removal.
    pub(crate) fn pin(&mut self, h: BlockHash) {
        if let Some(&(_, tick)) = self.slots.get(&h) {
            self.lru.remove(&(tick, h));
            self.pinned = Some(h);
        }
    }

    pub(crate) fn unpin(&mut self) {
        if let Some(h) = self.pinned.take()
            && let Some(&(_, tick)) = self.slots.get(&h)
        {
            self.lru.insert((tick, h));
        }
    }

    /// Occupied `(slot, hash)` pairs, by slot.
    pub(crate) fn entries(&self) -> Vec<(u32, BlockHash)> {
        self.owner
            .iter()
            .enumerate()
            .filter_map(|(s, h)| h.map(|h| (s as u32, h)))
            .collect()
    }

    pub(crate) fn hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.slots.keys().copied()
    }

    /// Turns the tier off: every slot is gone (the caller dropped the entries first).
    pub(crate) fn shut(&mut self) {
        *self = Self::new(0);
    }

    pub(crate) fn check(&self, name: &str) -> Result<(), String> {
        if self.free.len() + self.slots.len() != self.cap {
            return Err(format!(
                "{name}: {} free + {} used != {} slots",
                self.free.len(),
                self.slots.len(),
                self.cap
            ));
        }
        for (&h, &(slot, tick)) in &self.slots {
            if self.owner.get(slot as usize) != Some(&Some(h)) || self.free.contains(&slot) {
                return Err(format!("{name}: slot {slot} of {h:x} is not owned by it"));
            }
            if self.pinned != Some(h) && !self.lru.contains(&(tick, h)) {
                return Err(format!("{name}: {h:x} is missing from the LRU"));
            }
        }
        if self.lru.len() + usize::from(self.pinned.is_some()) != self.slots.len() {
            return Err(format!("{name}: LRU and slots disagree"));
        }
        Ok(())
    }
}
