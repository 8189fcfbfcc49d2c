//! The block allocator with its prefix index and LRU of unreferenced sealed blocks.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::chunks::{ChunkMap, ResidencyEvent, Tier};
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
    parent: Option<BlockHash>,
    /// LRU position while unreferenced and sealed.
    last_use: u64,
}

/// Counters for `/metrics` and the debug endpoint.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub num_blocks: usize,
    pub free: usize,
    /// Sealed, unreferenced, reusable (in the LRU).
    pub cached: usize,
    /// Referenced by at least one running sequence.
    pub in_use: usize,
    pub evictions: u64,
    pub hit_blocks: u64,
    pub lookup_blocks: u64,
    pub resident_chunks: usize,
}

/// Hands out block ids, tracks references, indexes sealed blocks by hash and evicts the least
/// recently used unreferenced ones; keeps the text-chunk residency map in step and records
/// every residency change as a [`ResidencyEvent`].
#[derive(Debug)]
pub struct BlockManager {
    cfg: KvConfig,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    index: HashMap<BlockHash, BlockId>,
    children: HashMap<BlockHash, Vec<BlockHash>>,
    lru: BTreeSet<(u64, BlockId)>,
    tick: u64,
    chunks: ChunkMap,
    events: Vec<ResidencyEvent>,
    evictions: u64,
    hit_blocks: u64,
    lookup_blocks: u64,
}

impl BlockManager {
    pub fn new(cfg: KvConfig) -> Self {
        let blocks = vec![
            Block {
                state: State::Free,
                refs: 0,
                hash: 0,
                parent: None,
                last_use: 0,
            };
            cfg.num_blocks
        ];
        // Pop from the end: hand out low ids first.
        let free = (0..cfg.num_blocks as BlockId).rev().collect();
        Self {
            cfg,
            blocks,
            free,
            index: HashMap::new(),
            children: HashMap::new(),
            lru: BTreeSet::new(),
            tick: 0,
            chunks: ChunkMap::default(),
            events: Vec::new(),
            evictions: 0,
            hit_blocks: 0,
            lookup_blocks: 0,
        }
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// Blocks that an allocation could get right now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// How many leading `hashes` are cached (sealed and indexed), without taking them.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }

    /// Takes a reference on the cached blocks of the longest cached prefix of `hashes` and
    /// returns their ids in order.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let n = self.cached_prefix(hashes);
        self.lookup_blocks += hashes.len() as u64;
        self.hit_blocks += n as u64;
        let ids: Vec<BlockId> = hashes[..n]
            .iter()
            .filter_map(|h| self.index.get(h).copied())
            .collect();
        for &id in &ids {
            self.take_ref(id);
        }
        ids
    }

    fn take_ref(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            self.lru.remove(&(b.last_use, id));
        }
        b.refs += 1;
    }

    /// A fresh block in the `Filling` state with one reference, evicting the least recently
    /// used cached block if none is free.
    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        if self.free.is_empty() {
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
        self.drop_cached(hash);
        Ok(())
    }

    /// Removes a cached block and its cached descendants (which cannot be referenced: a
    /// sequence holding a descendant holds its ancestors too) from the index.
    fn drop_cached(&mut self, hash: BlockHash) {
        let mut stack = vec![hash];
        while let Some(h) = stack.pop() {
            let Some(id) = self.index.remove(&h) else {
                continue;
            };
            if let Some(kids) = self.children.remove(&h) {
                stack.extend(kids);
            }
            let b = &mut self.blocks[id as usize];
            if let Some(p) = b.parent
                && let Some(siblings) = self.children.get_mut(&p)
            {
                siblings.retain(|&c| c != h);
            }
            if b.refs == 0 {
                self.lru.remove(&(b.last_use, id));
                b.state = State::Free;
                self.free.push(id);
            } else {
                // Still referenced (only possible for the block itself, never a descendant):
                // it stays sealed but unindexed and is freed on release.
            }
            self.evictions += 1;
            for chunk in self.chunks.remove_block(h) {
                self.events.push(ResidencyEvent::Removed {
                    chunk,
                    tier: Tier::Device,
                });
            }
        }
    }

    /// Marks a full `Filling` block as sealed with `hash` and indexes it for reuse. If an
    /// identical block is already indexed, the caller's block is released and the indexed one
    /// returned with a reference taken (its KV holds the same tokens after the same prefix):
    /// the caller replaces its block-table entry with the returned id.
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
        let b = &mut self.blocks[id as usize];
        b.state = State::Sealed;
        b.hash = hash;
        b.parent = parent;
        self.index.insert(hash, id);
        if let Some(p) = parent {
            self.children.entry(p).or_default().push(hash);
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
    /// resident (an `Added` event each) if the block is indexed and they were not mapped yet.
    pub fn map_chunks(&mut self, hash: BlockHash, chunks: &[u64]) {
        if !self.index.contains_key(&hash) {
            return;
        }
        for &c in chunks {
            if self.chunks.insert(c, hash) {
                self.events.push(ResidencyEvent::Added {
                    chunk: c,
                    tier: Tier::Device,
                });
            }
        }
    }

    /// Drops every cached (unreferenced) block and forgets their chunks.
    pub fn clear_cache(&mut self) {
        while self.evict_one().is_ok() {}
        self.events.push(ResidencyEvent::Cleared);
    }

    /// Residency changes since the last call.
    pub fn take_events(&mut self) -> Vec<ResidencyEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn chunk_map(&self) -> &ChunkMap {
        &self.chunks
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
        for (h, &id) in &self.index {
            let b = &self.blocks[id as usize];
            if b.state != State::Sealed || b.hash != *h {
                return Err(format!("index entry {h:x} -> {id} is stale"));
            }
            if let Some(p) = b.parent
                && !self.index.contains_key(&p)
            {
                return Err(format!("cached block {id} has an evicted parent"));
            }
        }
        Ok(())
    }
}
