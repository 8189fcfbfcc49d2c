//! One sequence's block table: the blocks that hold its KV, in token order.

use crate::manager::{BlockManager, KvError};
use crate::tiers::Place;
use crate::{BlockHash, BlockId, block_hash, block_hashes};

/// The ids of a sequence's blocks plus how many of its tokens have KV written. The model reads
/// and writes the physical pool through [`BlockTable::ids`]; the manager's references are
/// returned by [`BlockTable::release`].
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    block_tokens: usize,
    ids: Vec<BlockId>,
    hashes: Vec<BlockHash>,
    computed: usize,
}

impl BlockTable {
    pub fn new(block_tokens: usize) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            ..Self::default()
        }
    }

    pub fn ids(&self) -> &[BlockId] {
        &self.ids
    }

    /// Hashes of the sealed (full) blocks, in order.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }

    /// Tokens whose KV is in the pool.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// Takes the longest cached prefix of `tokens`, never more than `limit` tokens (so a caller
    /// can keep the last prompt token to compute its logits). Returns the tokens reused.
    pub fn adopt_prefix(&mut self, mgr: &mut BlockManager, tokens: &[u32], limit: usize) -> usize {
        self.adopt_prefix_with(mgr, tokens, limit, &mut |_, _| true)
    }

    /// Hashes of the full blocks of `tokens[..limit]` (what [`BlockTable::adopt_prefix`] looks
    /// up).
    pub fn prefix_hashes(&self, tokens: &[u32], limit: usize) -> Vec<BlockHash> {
        let full = limit.min(tokens.len()) / self.block_tokens;
        block_hashes(&tokens[..full * self.block_tokens], self.block_tokens)
    }

    /// [`BlockTable::adopt_prefix`] where a lower-tier block is fetched only if `fetch`
    /// agrees (see [`BlockManager::acquire_prefix_with`]).
    pub fn adopt_prefix_with(
        &mut self,
        mgr: &mut BlockManager,
        tokens: &[u32],
        limit: usize,
        fetch: &mut dyn FnMut(Place, BlockHash) -> bool,
    ) -> usize {
        debug_assert!(self.ids.is_empty());
        let hashes = self.prefix_hashes(tokens, limit);
        let ids = mgr.acquire_prefix_with(&hashes, fetch);
        self.hashes = hashes[..ids.len()].to_vec();
        self.computed = ids.len() * self.block_tokens;
        self.ids = ids;
        self.computed
    }

    /// After a prefix was adopted whole (every token's KV cached, so the last block is sealed
    /// and may be shared): swaps the last block for a fresh one that the caller fills with a
    /// copy of the shared one, and counts its last token as not computed, so that only that
    /// token runs again (for its logits) and writes into the copy, never into a shared block.
    /// Returns `(shared, fresh)`; the caller copies, then releases `shared`. Sealing the fresh
    /// block later finds the shared one by its hash and keeps that instead.
    pub fn unshare_last(&mut self, mgr: &mut BlockManager) -> Result<(BlockId, BlockId), KvError> {
        let (Some(&shared), Some(_)) = (self.ids.last(), self.hashes.last()) else {
            return Err(KvError::OutOfBlocks);
        };
        let fresh = mgr.allocate()?;
        *self.ids.last_mut().expect("checked above") = fresh;
        self.hashes.pop();
        self.computed = self.ids.len() * self.block_tokens - 1;
        Ok((shared, fresh))
    }

    /// Gives back the last adopted block, so its tokens are computed again (the fallback of
    /// [`BlockTable::unshare_last`] when no block is free).
    pub fn drop_last(&mut self, mgr: &mut BlockManager) {
        if let (Some(id), Some(_)) = (self.ids.pop(), self.hashes.pop()) {
            mgr.release(&[id]);
            self.computed = self.ids.len() * self.block_tokens;
        }
    }

    /// Blocks that must be allocated so that `total_tokens` fit.
    pub fn blocks_needed(&self, total_tokens: usize) -> usize {
        total_tokens
            .div_ceil(self.block_tokens)
            .saturating_sub(self.ids.len())
    }

    /// Allocates blocks until `total_tokens` fit; on failure nothing is kept.
    pub fn reserve(&mut self, mgr: &mut BlockManager, total_tokens: usize) -> Result<(), KvError> {
        let need = self.blocks_needed(total_tokens);
        if need > mgr.available() {
            return Err(KvError::OutOfBlocks);
        }
        let mut got = Vec::with_capacity(need);
        for _ in 0..need {
            match mgr.allocate() {
                Ok(id) => got.push(id),
                Err(e) => {
                    mgr.release(&got);
                    return Err(e);
                }
            }
        }
        self.ids.extend(got);
        Ok(())
    }

    /// Records that KV for `tokens[..new_computed]` is now in the pool and seals every block
    /// that became full. Returns `(block index, hash)` of each newly sealed block.
    pub fn commit(
        &mut self,
        mgr: &mut BlockManager,
        tokens: &[u32],
        new_computed: usize,
    ) -> Result<Vec<(usize, BlockHash)>, KvError> {
        let new_computed = new_computed.min(tokens.len());
        self.computed = self.computed.max(new_computed);
        let mut sealed = Vec::new();
        while (self.hashes.len() + 1) * self.block_tokens <= self.computed {
            let i = self.hashes.len();
            let id = *self.ids.get(i).ok_or(KvError::OutOfBlocks)?;
            let parent = self.hashes.last().copied();
            let h = block_hash(
                parent,
                &tokens[i * self.block_tokens..(i + 1) * self.block_tokens],
            );
            self.ids[i] = mgr.seal(id, h, parent)?;
            self.hashes.push(h);
            sealed.push((i, h));
        }
        Ok(sealed)
    }

    /// Returns every block reference to the manager; the table is empty afterwards.
    pub fn release(&mut self, mgr: &mut BlockManager) {
        mgr.release(&self.ids);
        self.ids.clear();
        self.hashes.clear();
        self.computed = 0;
    }
}
