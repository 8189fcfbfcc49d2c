//! One replica's KV cache at text-chunk granularity: three LRU tiers, where
//! eviction demotes device -> host -> disk -> gone.

use std::collections::{BTreeMap, HashMap};

/// Tier index: 0 device, 1 host, 2 disk (proto `Tier` is this plus one).
pub type TierIx = usize;

/// Number of residency shards per replica (changes touch one small shard).
pub const SHARDS: u32 = 64;

/// A tiered LRU of chunk hashes.
#[derive(Debug)]
pub struct TieredCache {
    capacity: [usize; 3],
    /// chunk -> (tier, stamp)
    where_: HashMap<u64, (TierIx, u64)>,
    /// Per tier: stamp -> chunk, oldest first.
    lru: [BTreeMap<u64, u64>; 3],
    clock: u64,
    /// Shards whose content changed since the last `take_dirty`.
    dirty: [bool; SHARDS as usize],
    /// Chunks per shard, so publishing a shard does not scan the cache.
    by_shard: Vec<std::collections::HashSet<u64>>,
}

impl TieredCache {
    /// A cache holding at most `capacity[t]` chunks in tier `t`.
    pub fn new(capacity: [usize; 3]) -> Self {
        Self {
            capacity,
            where_: HashMap::new(),
            lru: Default::default(),
            clock: 0,
            dirty: [false; SHARDS as usize],
            by_shard: vec![Default::default(); SHARDS as usize],
        }
    }

    /// The tiers of the longest resident prefix of `chunks`.
    pub fn prefix(&self, chunks: &[u64]) -> Vec<TierIx> {
        chunks
            .iter()
            .map_while(|c| self.where_.get(c).map(|&(t, _)| t))
            .collect()
    }

    /// Makes every chunk of a request resident on the device, most recent
    /// first for the leading chunks (so a prefix outlives its tail).
    pub fn insert(&mut self, chunks: &[u64]) {
        if self.capacity[0] == 0 {
            return;
        }
        for &c in chunks.iter().rev() {
            self.remove(c);
            self.put(c, 0);
        }
    }

    fn remove(&mut self, c: u64) -> Option<TierIx> {
        let (t, stamp) = self.where_.remove(&c)?;
        self.lru[t].remove(&stamp);
        let s = (c % u64::from(SHARDS)) as usize;
        self.dirty[s] = true;
        self.by_shard[s].remove(&c);
        Some(t)
    }

    fn put(&mut self, c: u64, tier: TierIx) {
        let mut tier = tier;
        while tier < 3 && self.capacity[tier] == 0 {
            tier += 1;
        }
        if tier >= 3 {
            return;
        }
        self.clock += 1;
        self.where_.insert(c, (tier, self.clock));
        self.lru[tier].insert(self.clock, c);
        let s = (c % u64::from(SHARDS)) as usize;
        self.dirty[s] = true;
        self.by_shard[s].insert(c);
        if self.lru[tier].len() > self.capacity[tier]
            && let Some((_, victim)) = self.lru[tier].pop_first()
        {
            self.where_.remove(&victim);
            let s = (victim % u64::from(SHARDS)) as usize;
            self.dirty[s] = true;
            self.by_shard[s].remove(&victim);
            if tier + 1 < 3 {
                self.put(victim, tier + 1);
            }
        }
    }

    /// Chunks resident in each tier.
    pub fn used(&self) -> [usize; 3] {
        [self.lru[0].len(), self.lru[1].len(), self.lru[2].len()]
    }

    /// Shards changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<u32> {
        let out = (0..SHARDS).filter(|&s| self.dirty[s as usize]).collect();
        self.dirty = [false; SHARDS as usize];
        out
    }

    /// The chunks of one shard, per tier.
    pub fn shard(&self, shard: u32) -> [Vec<u64>; 3] {
        let mut out: [Vec<u64>; 3] = Default::default();
        let Some(chunks) = self.by_shard.get(shard as usize) else {
            return out;
        };
        for c in chunks {
            if let Some(&(t, _)) = self.where_.get(c) {
                out[t].push(*c);
            }
        }
        for v in &mut out {
            v.sort_unstable();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_demotes_and_keeps_prefixes() {
        let mut c = TieredCache::new([2, 1, 1]);
        c.insert(&[1, 2]);
        assert_eq!(c.prefix(&[1, 2, 3]), vec![0, 0]);
        c.insert(&[3]);
        // 2 was the least recent device chunk (1 was touched last in the
        // first insert): demoted to host.
        assert_eq!(c.prefix(&[1, 2]), vec![0, 1]);
        c.insert(&[4]);
        // 1 demoted to host, pushing 2 down to disk.
        assert_eq!(c.prefix(&[1, 2]), vec![1, 2]);
        c.insert(&[5]);
        // 3 -> host, 1 -> disk, 2 gone.
        assert_eq!(c.prefix(&[1]), vec![2]);
        assert_eq!(c.prefix(&[2]), Vec::<TierIx>::new());
        assert_eq!(c.used(), [2, 1, 1]);
    }

    #[test]
    fn zero_capacity_tiers_are_skipped() {
        let mut c = TieredCache::new([1, 0, 1]);
        c.insert(&[1]);
        c.insert(&[2]);
        assert_eq!(c.prefix(&[1]), vec![2]);
        let mut none = TieredCache::new([0, 0, 0]);
        none.insert(&[1]);
        assert!(none.prefix(&[1]).is_empty());
    }
}
