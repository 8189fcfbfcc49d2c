//! Logical KV-cache state of the model server: which token blocks exist, who holds them,
//! which are cached for reuse, and which text chunks they make resident. It owns no tensors:
//! the physical block pool (`kvmesh-gpu-server-model::KvPool`, later HOST/DISK tiers) is indexed
//! by the [`BlockId`]s handed out here.
//!
//! Lifecycle of a block: `Free -> Filling` ([`BlockManager::allocate`]) `-> Sealed`
//! ([`BlockManager::seal`]: full, hashed, indexed for prefix reuse) `-> Free` again when it is
//! evicted from the LRU of unreferenced sealed blocks or released unsealed.
//!
//! Tiers: a cached block is in exactly one [`Place`]: the device pool, a HOST slot or a DISK
//! slot. Eviction demotes down the enabled tiers, a prefix hit promotes back into the device
//! pool, and each copy that implies is handed to the physical layer as a [`Move`].

mod chunks;
mod manager;
mod table;
mod tiers;

pub use chunks::{ChunkMap, ResidencyEvent, Tier};
pub use manager::{BlockManager, CacheStats, KvConfig, KvError, RestoredBlock};
pub use table::BlockTable;
pub use tiers::{Move, Place, TierCounters};

/// Index of a block in the physical pool.
pub type BlockId = u32;

/// Hash of a sealed block: chained over the token ids of this block and every block before it.
pub type BlockHash = u64;

/// The hash of a full block given its parent's hash (`None` for the first block).
///
/// `h[i] = xxh3(seed = h[i-1] or 0, little-endian token ids of block i)`. Every block hash
/// therefore identifies the whole token prefix up to the end of its block.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(tokens.len() * 4 + 1);
    // A marker byte so that the first block's hash never equals a chained one by construction.
    bytes.push(u8::from(parent.is_some()));
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, parent.unwrap_or(0))
}

/// Block hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[u32], block_tokens: usize) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_tokens.max(1));
    let mut parent = None;
    for block in tokens.chunks_exact(block_tokens.max(1)) {
        let h = block_hash(parent, block);
        out.push(h);
        parent = Some(h);
    }
    out
}
