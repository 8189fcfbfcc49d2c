//! The map from text-chunk hashes (the SDK's chain over the canonical prompt bytes) to the
//! sealed token block that holds the chunk's last byte.
//!
//! A chunk is resident while that block is cached: the block's hash chains over every token
//! before it, and the manager only evicts a block together with its cached descendants, so
//! "the block is indexed" implies "every block before it is indexed" too.

use std::collections::HashMap;

use serde::Serialize;

use crate::BlockHash;

/// Where a block (and so a chunk) is held; mirrors `kvmesh.v1.Tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Tier {
    Device,
    Host,
    Disk,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Disk];

    /// Lower-case name for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

/// A change in which text chunks are resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ResidencyEvent {
    Added {
        chunk: u64,
        tier: Tier,
    },
    Removed {
        chunk: u64,
        tier: Tier,
    },
    /// Everything was dropped (a reset); receivers forget all chunks.
    Cleared,
}

/// Chunk hash -> block hash, and back.
#[derive(Debug, Default)]
pub struct ChunkMap {
    by_chunk: HashMap<u64, BlockHash>,
    by_block: HashMap<BlockHash, Vec<u64>>,
}

impl ChunkMap {
    /// Maps `chunk` to `block` unless it is already mapped (the first mapping wins: it stays
    /// true while its block is cached). Returns whether the chunk became resident.
    pub fn insert(&mut self, chunk: u64, block: BlockHash) -> bool {
        if self.by_chunk.contains_key(&chunk) {
            return false;
        }
        self.by_chunk.insert(chunk, block);
        self.by_block.entry(block).or_default().push(chunk);
        true
    }

    /// Forgets every chunk held by `block`; returns them.
    pub fn remove_block(&mut self, block: BlockHash) -> Vec<u64> {
        let chunks = self.by_block.remove(&block).unwrap_or_default();
        for c in &chunks {
            self.by_chunk.remove(c);
        }
        chunks
    }

    /// The chunks mapped to `block`.
    pub fn chunks_of(&self, block: BlockHash) -> &[u64] {
        self.by_block.get(&block).map_or(&[], Vec::as_slice)
    }

    /// Every block with chunks, and its chunks.
    pub fn blocks(&self) -> impl Iterator<Item = (BlockHash, &[u64])> + '_ {
        self.by_block.iter().map(|(&h, v)| (h, v.as_slice()))
    }

    /// Every (chunk, block) pair.
    pub fn entries(&self) -> impl Iterator<Item = (&u64, &BlockHash)> + '_ {
        self.by_chunk.iter()
    }

    pub fn contains(&self, chunk: u64) -> bool {
        self.by_chunk.contains_key(&chunk)
    }

    pub fn len(&self) -> usize {
        self.by_chunk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_chunk.is_empty()
    }

    /// Every resident chunk hash, sorted (for snapshots and the debug endpoint).
    pub fn chunks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.by_chunk.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn clear(&mut self) {
        self.by_chunk.clear();
        self.by_block.clear();
    }
}
