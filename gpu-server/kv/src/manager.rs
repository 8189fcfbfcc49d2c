//! The block allocator with its prefix index and LRU of unreferenced sealed blocks, and the
//! lower tiers (HOST, DISK) that evicted blocks are demoted to.
//!
//! A cached block (sealed, indexed by its hash) is in exactly one place: a device block, or a
//! slot of HOST or DISK. Evicting a device block demotes it to the next enabled tier below,
//! whose own LRU victim goes further down; the last tier drops its victim together with every
//! cached descendant (in any tier), so the cache stays prefix-closed: a cached block's parent
//! is always cached somewhere. A prefix hit in a lower tier promotes the block into a fresh
//! device block. Every copy this implies is recorded as a [`Move`] for the physical layer.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::chunks::{ChunkMap, ResidencyEvent, Tier};
use crate::tiers::{Lower, Move, Place, TierCounters};
use crate::{BlockHash, BlockId};

/// Shape of the logical cache; fixed for the life of a [`BlockManager`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Tokens per block (16 by default).
    pub block_tokens: usize,
    /// Blocks in the (device) pool.
    pub num_blocks: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("no free or evictable KV block left")]
    OutOfBlocks,
    #[error("block {0} is not in the state this operation needs")]
    BadState(BlockId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Filling,
    Sealed,
}

#[derive(Debug, Clone)]
struct Block {
    state: State,
    refs: u32,
    /// Set once sealed.
    hash: BlockHash,
    /// LRU position while unreferenced and sealed.
    last_use: u64,
}

/// Counters for `/metrics` and the debug endpoint (device tier and totals).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub num_blocks: usize,
    pub free: usize,
    /// Sealed, unreferenced, reusable (in the LRU).
    pub cached: usize,
    /// Referenced by at least one running sequence.
    pub in_use: usize,
    /// Cached blocks dropped from every tier.
    pub evictions: u64,
    /// Prompt blocks served from any tier.
    pub hit_blocks: u64,
    pub lookup_blocks: u64,
    /// Text chunks resident in any tier.
    pub resident_chunks: usize,
}

const HOST: usize = 0;
const DISK: usize = 1;

fn lower_index(t: Tier) -> Option<usize> {
    match t {
        Tier::Device => None,
        Tier::Host => Some(HOST),
        Tier::Disk => Some(DISK),
    }
}

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Device => 0,
        Tier::Host => 1,
        Tier::Disk => 2,
    }
}

/// A disk slot found valid at start-up (warm restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredBlock {
    pub slot: u32,
    pub hash: BlockHash,
    pub parent: Option<BlockHash>,
    pub chunks: Vec<u64>,
    /// Write order (older first); restores the LRU order.
    pub written: u64,
}

/// Hands out block ids, tracks references, indexes sealed blocks by hash in every tier,
/// demotes and promotes them, and keeps the text-chunk residency map in step, recording every
/// residency change as a [`ResidencyEvent`] and every copy as a [`Move`].
#[derive(Debug)]
pub struct BlockManager {
    cfg: KvConfig,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    /// Device-resident cached blocks.
    index: HashMap<BlockHash, BlockId>,
    lower: [Lower; 2],
    /// Parent of every cached block (any tier).
    parents: HashMap<BlockHash, Option<BlockHash>>,
    /// Cached children of every cached block (any tier).
    children: HashMap<BlockHash, Vec<BlockHash>>,
    lru: BTreeSet<(u64, BlockId)>,
    tick: u64,
    chunks: ChunkMap,
    events: Vec<ResidencyEvent>,
    moves: Vec<Move>,
    counters: [TierCounters; 3],
    evictions: u64,
    hit_blocks: u64,
    lookup_blocks: u64,
}

impl BlockManager {
    /// A device-only cache.
    pub fn new(cfg: KvConfig) -> Self {
        Self::tiered(cfg, 0, 0)
    }

    /// A cache with `host_blocks` HOST slots and `disk_blocks` DISK slots (0 = tier off).
    pub fn tiered(cfg: KvConfig, host_blocks: usize, disk_blocks: usize) -> Self {
        let blocks = vec![
            Block {
                state: State::Free,
                refs: 0,
                hash: 0,
                last_use: 0,
            };
            cfg.num_blocks
        ];
        // Pop from the end: hand out low ids first.
        let free = (0..cfg.num_blocks as BlockId).rev().collect();
        let mut counters = [TierCounters::default(); 3];
        counters[0].capacity_blocks = cfg.num_blocks as u64;
        counters[1].capacity_blocks = host_blocks as u64;
        counters[2].capacity_blocks = disk_blocks as u64;
        Self {
            cfg,
            blocks,
            free,
            index: HashMap::new(),
            lower: [Lower::new(host_blocks), Lower::new(disk_blocks)],
            parents: HashMap::new(),
            children: HashMap::new(),
            lru: BTreeSet::new(),
            tick: 0,
            chunks: ChunkMap::default(),
            events: Vec::new(),
            moves: Vec::new(),
            counters,
            evictions: 0,
            hit_blocks: 0,
            lookup_blocks: 0,
        }
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// Slots of a tier (0 when it is off).
    pub fn capacity(&self, tier: Tier) -> usize {
        match lower_index(tier) {
            None => self.cfg.num_blocks,
            Some(i) => self.lower[i].cap(),
        }
    }

    /// Blocks that an allocation could get right now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Where the cached block `h` is, if anywhere.
    pub fn place(&self, h: BlockHash) -> Option<Place> {
        if let Some(&id) = self.index.get(&h) {
            return Some(Place::Device(id));
        }
        if let Some(s) = self.lower[HOST].slot(h) {
            return Some(Place::Host(s));
        }
        self.lower[DISK].slot(h).map(Place::Disk)
    }

    fn tier_of(&self, h: BlockHash) -> Option<Tier> {
        self.place(h).map(Place::tier)
    }

    /// How many leading `hashes` are cached in any tier, without taking them.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|&&h| self.place(h).is_some())
            .count()
    }

    /// The places of the longest cached prefix of `hashes`.
    pub fn locate_prefix(&self, hashes: &[BlockHash]) -> Vec<Place> {
        hashes.iter().map_while(|&h| self.place(h)).collect()
    }

    /// Takes a reference on the longest cached prefix of `hashes`, promoting blocks of lower
    /// tiers into the device pool, and returns the device ids in order.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        self.acquire_prefix_with(hashes, &mut |_, _| true)
    }

    /// Like [`BlockManager::acquire_prefix`], but a block in a lower tier is only fetched when
    /// `fetch(place, hash)` agrees (the cost model); the prefix ends at the first block that is
    /// not fetched (it will be recomputed).
    pub fn acquire_prefix_with(
        &mut self,
        hashes: &[BlockHash],
        fetch: &mut dyn FnMut(Place, BlockHash) -> bool,
    ) -> Vec<BlockId> {
        let mut ids = Vec::new();
        let mut served = [0u64; 3];
        for &h in hashes {
            match self.place(h) {
                Some(Place::Device(id)) => {
                    self.take_ref(id);
                    served[0] += 1;
                    ids.push(id);
                }
                Some(p) if fetch(p, h) => match self.promote(h) {
                    Ok(id) => {
                        served[tier_index(p.tier())] += 1;
                        ids.push(id);
                    }
                    Err(_) => break,
                },
                _ => break,
            }
        }
        let n = hashes.len() as u64;
        self.lookup_blocks += n;
        self.hit_blocks += ids.len() as u64;
        let mut above = 0;
        for (t, (c, s)) in self.counters.iter_mut().zip(served).enumerate() {
            c.hits += s;
            above += s;
            if t == 0 || c.capacity_blocks > 0 {
                c.misses += n - above;
            }
        }
        ids
    }

    /// Moves the lower-tier block `h` into a fresh device block with one reference.
    fn promote(&mut self, h: BlockHash) -> Result<BlockId, KvError> {
        let from = self.place(h).ok_or(KvError::OutOfBlocks)?;
        let li = lower_index(from.tier()).ok_or(KvError::OutOfBlocks)?;
        // Pinned, `h` cannot be chosen to make room for its own promotion; its ancestors are
        // all referenced in the device tier, so no cascade can reach it either.
        self.lower[li].pin(h);
        let got = self.allocate();
        self.lower[li].unpin();
        let id = got?;
        self.lower[li].remove(h);
        let ti = tier_index(from.tier());
        self.counters[ti].promotions += 1;
        self.counters[ti].blocks_out += 1;
        self.counters[0].blocks_in += 1;
        let b = &mut self.blocks[id as usize];
        b.state = State::Sealed;
        b.hash = h;
        self.index.insert(h, id);
        self.retier_chunks(h, from.tier(), Tier::Device);
        self.moves.push(Move {
            hash: h,
            parent: self.parents.get(&h).copied().flatten(),
            from,
            to: Place::Device(id),
            chunks: Vec::new(),
        });
        Ok(id)
    }

    fn retier_chunks(&mut self, h: BlockHash, from: Tier, to: Tier) {
        for &chunk in self.chunks.chunks_of(h) {
            self.events
                .push(ResidencyEvent::Removed { chunk, tier: from });
            self.events.push(ResidencyEvent::Added { chunk, tier: to });
        }
    }

    fn take_ref(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            self.lru.remove(&(b.last_use, id));
        }
        b.refs += 1;
    }

    /// A fresh block in the `Filling` state with one reference, evicting (demoting) the least
    /// recently used cached block if none is free.
    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        while self.free.is_empty() {
            self.evict_one()?;
        }
        let id = self.free.pop().ok_or(KvError::OutOfBlocks)?;
        let b = &mut self.blocks[id as usize];
        b.state = State::Filling;
        b.refs = 1;
        Ok(id)
    }

    fn evict_one(&mut self) -> Result<(), KvError> {
        let &(tick, id) = self.lru.iter().next().ok_or(KvError::OutOfBlocks)?;
        self.lru.remove(&(tick, id));
        let hash = self.blocks[id as usize].hash;
        self.counters[0].evictions += 1;
        self.demote(hash, Tier::Device);
        Ok(())
    }

    fn below(&self, t: Tier) -> Option<Tier> {
        let order: &[Tier] = match t {
            Tier::Device => &[Tier::Host, Tier::Disk],
            Tier::Host => &[Tier::Disk],
            Tier::Disk => &[],
        };
        order.iter().copied().find(|&n| self.capacity(n) > 0)
    }

    /// Moves `h` (out of its tier's LRU already, or a lower tier's victim) to the next enabled
    /// tier below `from`, or drops it (with its descendants) when there is none.
    fn demote(&mut self, h: BlockHash, from: Tier) {
        let Some(to) = self.below(from) else {
            self.drop_cached(h);
            return;
        };
        let li = lower_index(to).unwrap_or(DISK);
        if !self.make_room(li) {
            self.drop_cached(h);
            return;
        }
        // Making room may have dropped `h` (a victim further down was its ancestor).
        let Some(src) = self.place(h) else {
            return;
        };
        self.tick += 1;
        let Some(slot) = self.lower[li].insert(h, self.tick) else {
            self.drop_cached(h);
            return;
        };
        match src {
            Place::Device(id) => {
                self.index.remove(&h);
                let b = &mut self.blocks[id as usize];
                b.state = State::Free;
                self.free.push(id);
            }
            Place::Host(_) => {
                self.lower[HOST].remove(h);
            }
            Place::Disk(_) => {
                self.lower[DISK].remove(h);
            }
        }
        let dst = if to == Tier::Host {
            Place::Host(slot)
        } else {
            Place::Disk(slot)
        };
        self.counters[tier_index(from)].blocks_out += 1;
        let ti = tier_index(to);
        self.counters[ti].demotions += 1;
        self.counters[ti].blocks_in += 1;
        self.retier_chunks(h, from, to);
        self.moves.push(Move {
            hash: h,
            parent: self.parents.get(&h).copied().flatten(),
            from: src,
            to: dst,
            chunks: self.chunks.chunks_of(h).to_vec(),
        });
    }

    /// Frees a slot in lower tier `li` if it is full; false if it cannot.
    fn make_room(&mut self, li: usize) -> bool {
        let tier = if li == HOST { Tier::Host } else { Tier::Disk };
        while self.lower[li].is_full() {
            if self.lower[li].cap() == 0 {
                return false;
            }
            let Some(v) = self.lower[li].victim() else {
                return false;
            };
            self.counters[tier_index(tier)].evictions += 1;
            self.demote(v, tier);
        }
        true
    }

    /// Removes a cached block and every cached descendant from whatever tier holds them.
    /// A device descendant cannot be referenced: a sequence holding it holds its ancestors,
    /// all in the device tier.
    fn drop_cached(&mut self, hash: BlockHash) {
        let mut stack = vec![hash];
        while let Some(h) = stack.pop() {
            let Some(place) = self.place(h) else {
                continue;
            };
            match place {
                Place::Device(id) => {
                    self.index.remove(&h);
                    let b = &mut self.blocks[id as usize];
                    if b.refs == 0 {
                        self.lru.remove(&(b.last_use, id));
                        b.state = State::Free;
                        self.free.push(id);
                    } else {
                        // Still referenced (only possible for the block itself): it stays
                        // sealed but unindexed and is freed on release.
                    }
                }
                Place::Host(_) => {
                    self.lower[HOST].remove(h);
                }
                Place::Disk(_) => {
                    self.lower[DISK].remove(h);
                }
            }
            if let Some(kids) = self.children.remove(&h) {
                stack.extend(kids);
            }
            if let Some(Some(p)) = self.parents.remove(&h)
                && let Some(siblings) = self.children.get_mut(&p)
            {
                siblings.retain(|&c| c != h);
            }
            self.evictions += 1;
            let tier = place.tier();
            for chunk in self.chunks.remove_block(h) {
                self.events.push(ResidencyEvent::Removed { chunk, tier });
            }
        }
    }

    /// Marks a full `Filling` block as sealed with `hash` and indexes it for reuse. If an
    /// identical block is already in the device tier, the caller's block is released and the
    /// indexed one returned with a reference taken (its KV holds the same tokens after the
    /// same prefix): the caller replaces its block-table entry with the returned id. If it is
    /// in a lower tier (recomputed rather than fetched), that copy is dropped and this block
    /// takes its place.
    pub fn seal(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        parent: Option<BlockHash>,
    ) -> Result<BlockId, KvError> {
        let b = self.blocks.get(id as usize).ok_or(KvError::BadState(id))?;
        if b.state != State::Filling || b.refs == 0 {
            return Err(KvError::BadState(id));
        }
        if let Some(&existing) = self.index.get(&hash) {
            self.take_ref(existing);
            self.release(&[id]);
            return Ok(existing);
        }
        let lower = self.place(hash).map(Place::tier);
        if let Some(t) = lower {
            if let Some(li) = lower_index(t) {
                self.lower[li].remove(hash);
            }
            self.retier_chunks(hash, t, Tier::Device);
        }
        let b = &mut self.blocks[id as usize];
        b.state = State::Sealed;
        b.hash = hash;
        self.index.insert(hash, id);
        if lower.is_none() {
            self.parents.insert(hash, parent);
            if let Some(p) = parent {
                self.children.entry(p).or_default().push(hash);
            }
        }
        Ok(id)
    }

    /// Drops one reference on each block. Blocks are visited from the last to the first, so
    /// that within one sequence the tail becomes least recently used and is evicted first.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let Some(b) = self.blocks.get_mut(id as usize) else {
                continue;
            };
            if b.refs == 0 {
                continue;
            }
            b.refs -= 1;
            if b.refs > 0 {
                continue;
            }
            let indexed = b.state == State::Sealed && self.index.get(&b.hash) == Some(&id);
            if indexed {
                self.tick += 1;
                b.last_use = self.tick;
                self.lru.insert((self.tick, id));
            } else {
                b.state = State::Free;
                self.free.push(id);
            }
        }
    }

    /// Records that the text chunks `chunks` end inside the sealed block `hash`. Chunks become
    /// resident (an `Added` event each, in the block's tier) if the block is cached and they
    /// were not mapped yet.
    pub fn map_chunks(&mut self, hash: BlockHash, chunks: &[u64]) {
        let Some(tier) = self.tier_of(hash) else {
            return;
        };
        for &c in chunks {
            if self.chunks.insert(c, hash) {
                self.events.push(ResidencyEvent::Added { chunk: c, tier });
            }
        }
    }

    /// Drops the cached block `h` (and its cached descendants) from whatever tier holds it,
    /// e.g. because its stored copy turned out corrupt. A referenced device block stays
    /// usable by its holders but is no longer indexed.
    pub fn forget(&mut self, h: BlockHash) {
        self.drop_cached(h);
    }

    /// Drops every unreferenced cached block of every tier and forgets their chunks.
    pub fn clear_cache(&mut self) {
        let mut all: Vec<BlockHash> = self
            .lru
            .iter()
            .map(|&(_, id)| self.blocks[id as usize].hash)
            .collect();
        all.extend(self.lower[HOST].hashes());
        all.extend(self.lower[DISK].hashes());
        for h in all {
            self.drop_cached(h);
        }
        self.events.push(ResidencyEvent::Cleared);
    }

    /// Turns a lower tier off (e.g. its disk failed): its blocks and their descendants are
    /// dropped and demotions skip it from now on.
    pub fn disable_tier(&mut self, tier: Tier) {
        let Some(li) = lower_index(tier) else {
            return;
        };
        let all: Vec<BlockHash> = self.lower[li].hashes().collect();
        for h in all {
            self.drop_cached(h);
        }
        self.lower[li].shut();
        self.counters[tier_index(tier)].capacity_blocks = 0;
    }

    /// Indexes disk slots found valid at start-up. Blocks whose parent chain is not complete
    /// are left out (they could never be reached); so are duplicates. Returns how many were
    /// indexed. Call before serving.
    pub fn restore_disk(&mut self, mut found: Vec<RestoredBlock>) -> usize {
        found.sort_by_key(|b| b.written);
        let by_hash: HashMap<BlockHash, usize> =
            found.iter().enumerate().map(|(i, b)| (b.hash, i)).collect();
        // A block is reachable when every ancestor is in `found`.
        let mut ok: HashMap<BlockHash, bool> = HashMap::new();
        fn reachable(
            h: BlockHash,
            found: &[RestoredBlock],
            by_hash: &HashMap<BlockHash, usize>,
            ok: &mut HashMap<BlockHash, bool>,
        ) -> bool {
            let mut chain = Vec::new();
            let mut cur = Some(h);
            let mut result = true;
            while let Some(c) = cur {
                if let Some(&r) = ok.get(&c) {
                    result = r;
                    break;
                }
                let Some(&i) = by_hash.get(&c) else {
                    result = false;
                    break;
                };
                if chain.len() > by_hash.len() {
                    result = false; // a cycle: corrupt metadata
                    break;
                }
                chain.push(c);
                cur = found[i].parent;
            }
            for c in chain {
                ok.insert(c, result);
            }
            result
        }
        // Insert parents before children: by depth.
        let mut order: Vec<(usize, usize)> = Vec::new();
        for (i, b) in found.iter().enumerate() {
            if by_hash.get(&b.hash) != Some(&i) || !reachable(b.hash, &found, &by_hash, &mut ok) {
                continue;
            }
            let mut depth = 0;
            let mut cur = b.parent;
            while let Some(p) = cur {
                depth += 1;
                cur = by_hash.get(&p).and_then(|&j| found[j].parent);
            }
            order.push((depth, i));
        }
        order.sort_unstable();
        let mut n = 0;
        for (_, i) in order {
            let b = &found[i];
            if self.place(b.hash).is_some() {
                continue;
            }
            self.tick += 1;
            // Older writes get older ticks: found is sorted by write order.
            if !self.lower[DISK].insert_at(b.hash, b.slot, b.written) {
                continue;
            }
            self.parents.insert(b.hash, b.parent);
            if let Some(p) = b.parent {
                self.children.entry(p).or_default().push(b.hash);
            }
            for &c in &b.chunks {
                if self.chunks.insert(c, b.hash) {
                    self.events.push(ResidencyEvent::Added {
                        chunk: c,
                        tier: Tier::Disk,
                    });
                }
            }
            n += 1;
        }
        self.tick = self
            .tick
            .max(found.iter().map(|b| b.written).max().unwrap_or(0));
        n
    }

    /// Residency changes since the last call.
    pub fn take_events(&mut self) -> Vec<ResidencyEvent> {
        std::mem::take(&mut self.events)
    }

    /// Copies to carry out since the last call, in order.
    pub fn take_moves(&mut self) -> Vec<Move> {
        std::mem::take(&mut self.moves)
    }

    pub fn chunk_map(&self) -> &ChunkMap {
        &self.chunks
    }

    /// Resident chunk hashes of one tier, sorted.
    pub fn resident_chunks(&self, tier: Tier) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .chunks
            .blocks()
            .filter(|&(h, _)| self.tier_of(h) == Some(tier))
            .flat_map(|(_, cs)| cs.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }

    /// Cached block hashes of one tier with their slot (device: block id), by slot.
    pub fn tier_contents(&self, tier: Tier) -> Vec<(u32, BlockHash)> {
        match lower_index(tier) {
            Some(li) => self.lower[li].entries(),
            None => {
                let mut v: Vec<(u32, BlockHash)> =
                    self.index.iter().map(|(&h, &id)| (id, h)).collect();
                v.sort_unstable();
                v
            }
        }
    }

    /// Counters of one tier.
    pub fn tier_counters(&self, tier: Tier) -> TierCounters {
        let mut c = self.counters[tier_index(tier)];
        c.used_blocks = match lower_index(tier) {
            Some(li) => self.lower[li].len() as u64,
            None => (self.cfg.num_blocks - self.free.len()) as u64,
        };
        c
    }

    pub fn stats(&self) -> CacheStats {
        let in_use = self.blocks.iter().filter(|b| b.refs > 0).count();
        CacheStats {
            num_blocks: self.cfg.num_blocks,
            free: self.free.len(),
            cached: self.lru.len(),
            in_use,
            evictions: self.evictions,
            hit_blocks: self.hit_blocks,
            lookup_blocks: self.lookup_blocks,
            resident_chunks: self.chunks.len(),
        }
    }

    /// Checks every structural invariant; for tests. Returns a description of the first
    /// violation.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.blocks.len()];
        for &id in &self.free {
            let b = &self.blocks[id as usize];
            if b.state != State::Free || b.refs != 0 {
                return Err(format!("free block {id} is {:?} refs {}", b.state, b.refs));
            }
            seen[id as usize] += 1;
        }
        for &(t, id) in &self.lru {
            let b = &self.blocks[id as usize];
            if b.state != State::Sealed || b.refs != 0 || b.last_use != t {
                return Err(format!("lru block {id} is {:?} refs {}", b.state, b.refs));
            }
            if self.index.get(&b.hash) != Some(&id) {
                return Err(format!("lru block {id} is not indexed"));
            }
            seen[id as usize] += 1;
        }
        for (id, b) in self.blocks.iter().enumerate() {
            if b.refs > 0 {
                if b.state == State::Free {
                    return Err(format!("referenced block {id} is free"));
                }
                seen[id] += 1;
            }
            if seen[id] != 1 {
                return Err(format!(
                    "block {id} is in {} places (leak or double free)",
                    seen[id]
                ));
            }
        }
        self.lower[HOST].check("host")?;
        self.lower[DISK].check("disk")?;
        let mut cached = 0;
        for (h, &id) in &self.index {
            let b = &self.blocks[id as usize];
            if b.state != State::Sealed || b.hash != *h {
                return Err(format!("index entry {h:x} -> {id} is stale"));
            }
            if self.lower[HOST].slot(*h).is_some() || self.lower[DISK].slot(*h).is_some() {
                return Err(format!("block {h:x} is in the device tier and a lower one"));
            }
            cached += 1;
        }
        for (h, s) in self.lower[HOST].entries().into_iter().map(|(s, h)| (h, s)) {
            if self.lower[DISK].slot(h).is_some() {
                return Err(format!("block {h:x} (host slot {s}) is on disk too"));
            }
        }
        cached += self.lower[HOST].len() + self.lower[DISK].len();
        if self.parents.len() != cached {
            return Err(format!(
                "{} parent entries for {cached} cached blocks",
                self.parents.len()
            ));
        }
        for (&h, &p) in &self.parents {
            if self.place(h).is_none() {
                return Err(format!("parent entry of uncached block {h:x}"));
            }
            if let Some(p) = p {
                if self.place(p).is_none() {
                    return Err(format!("cached block {h:x} has an evicted parent"));
                }
                if !self.children.get(&p).is_some_and(|c| c.contains(&h)) {
                    return Err(format!("block {h:x} missing from its parent's children"));
                }
            }
        }
        for (&c, &h) in self.chunks.entries() {
            if self.place(h).is_none() {
                return Err(format!("chunk {c:x} maps to uncached block {h:x}"));
            }
        }
        Ok(())
    }
}
