//! A bounded map that forgets its least recently written entries.

use crate::snapshot::ChunkMap;

/// Two generations: writes go to the young one; when it is full the old one is
/// dropped and the young one becomes old. Lookups see both. So it holds at most
/// `2 * capacity / 2 = capacity` entries, and an entry written in the last
/// `capacity / 2` writes is always found.
#[derive(Debug, Clone)]
pub struct AgingMap<V> {
    young: ChunkMap<V>,
    old: ChunkMap<V>,
    half: usize,
}

impl<V: Copy> AgingMap<V> {
    /// A map holding at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            young: ChunkMap::default(),
            old: ChunkMap::default(),
            half: (capacity / 2).max(1),
        }
    }

    /// The value for `key`, young first.
    pub fn get(&self, key: u64) -> Option<V> {
        self.young.get(&key).or_else(|| self.old.get(&key)).copied()
    }

    /// Writes `key`; may age out the oldest generation.
    pub fn insert(&mut self, key: u64, value: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }

    /// Every key held, each once (young first).
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.young.keys().copied().chain(
            self.old
                .keys()
                .copied()
                .filter(|k| !self.young.contains_key(k)),
        )
    }

    /// Entries held (both generations; a key in both counts twice).
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.young.is_empty() && self.old.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bounded_and_recent_writes_found(
            keys in proptest::collection::vec(0u64..500, 1..3000),
            capacity in 2usize..200,
        ) {
            let mut m = AgingMap::new(capacity);
            for (i, &k) in keys.iter().enumerate() {
                m.insert(k, i);
                prop_assert!(m.len() <= capacity.max(2));
                prop_assert_eq!(m.get(k), Some(i));
            }
            // Every key once, the last written among them.
            let mut held: Vec<u64> = m.keys().collect();
            let n = held.len();
            held.sort_unstable();
            held.dedup();
            prop_assert_eq!(held.len(), n, "a key listed twice");
            prop_assert!(held.iter().all(|&k| m.get(k).is_some()));
            prop_assert!(held.contains(keys.last().unwrap()));
        }
    }
}
