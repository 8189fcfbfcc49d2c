//! Text-chunk identity: canonical prompt bytes cut into fixed-size chunks,
//! each hashed together with the hash of the chunk before it.
//!
//! `h[0] = xxh3(chunk[0], seed)`, `h[i] = xxh3(chunk[i], seed ^ h[i-1])`, where
//! `seed = xxh3("kvmesh.v1" ++ 0x00 ++ model)`. Only full chunks are hashed. A
//! replica holds chunk `i` only if it holds chunks `0..i`, so the match
//! between a request and a replica is the length of the longest run of the
//! request's leading hashes that the replica holds.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Chunk size used when a pool does not configure one.
pub const DEFAULT_CHUNK_BYTES: u32 = 256;

/// Smallest chunk size accepted in a configuration.
pub const MIN_CHUNK_BYTES: u32 = 16;

/// The seed of a model's hash chain; two models never share chunk identities.
pub fn model_seed(model: &str) -> u64 {
    let mut buf = Vec::with_capacity(10 + model.len());
    buf.extend_from_slice(b"kvmesh.v1\0");
    buf.extend_from_slice(model.as_bytes());
    xxh3_64(&buf)
}

/// The hash chain of every full chunk of `canonical`.
///
/// Returns an empty list when `chunk_bytes` is zero.
pub fn chunk_hashes(model: &str, canonical: &[u8], chunk_bytes: u32) -> Vec<u64> {
    let mut hasher = ChunkHasher::new(model, chunk_bytes);
    hasher.update(canonical);
    hasher.finish()
}

/// Incremental form of [`chunk_hashes`], for bytes that arrive in pieces.
#[derive(Debug, Clone)]
pub struct ChunkHasher {
    seed: u64,
    prev: u64,
    chunk_bytes: usize,
    partial: Vec<u8>,
    hashes: Vec<u64>,
}

impl ChunkHasher {
    /// A hasher for `model`'s chain with chunks of `chunk_bytes`.
    pub fn new(model: &str, chunk_bytes: u32) -> Self {
        Self::with_seed(model_seed(model), chunk_bytes)
    }

    /// A hasher from a precomputed [`model_seed`].
    pub fn with_seed(seed: u64, chunk_bytes: u32) -> Self {
        Self {
            seed,
            prev: 0,
            chunk_bytes: chunk_bytes as usize,
            partial: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// Feeds more canonical bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.chunk_bytes == 0 {
            return;
        }
        if !self.partial.is_empty() {
            let need = self.chunk_bytes - self.partial.len();
            let take = need.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < self.chunk_bytes {
                return;
            }
            let chunk = std::mem::take(&mut self.partial);
            self.push_chunk(&chunk);
            self.partial = chunk;
            self.partial.clear();
        }
        let mut chunks = bytes.chunks_exact(self.chunk_bytes);
        for chunk in &mut chunks {
            self.push_chunk(chunk);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    /// Hashes of the full chunks fed so far.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Ends the stream; a trailing partial chunk is not hashed.
    pub fn finish(self) -> Vec<u64> {
        self.hashes
    }

    fn push_chunk(&mut self, chunk: &[u8]) {
        self.prev = xxh3_64_with_seed(chunk, self.seed ^ self.prev);
        self.hashes.push(self.prev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_full_chunks_count() {
        assert!(chunk_hashes("m", &[b'a'; 255], 256).is_empty());
        assert_eq!(chunk_hashes("m", &[b'a'; 256], 256).len(), 1);
        assert_eq!(chunk_hashes("m", &[b'a'; 767], 256).len(), 2);
        assert!(chunk_hashes("m", &[b'a'; 767], 0).is_empty());
    }

    #[test]
    fn model_seeds_the_chain() {
        let text = [b'x'; 512];
        assert_ne!(chunk_hashes("a", &text, 256), chunk_hashes("b", &text, 256));
    }

    #[test]
    fn chain_depends_on_every_earlier_chunk() {
        let mut a = vec![b'a'; 768];
        let h1 = chunk_hashes("m", &a, 256);
        a[0] = b'b';
        let h2 = chunk_hashes("m", &a, 256);
        assert!(h1.iter().zip(&h2).all(|(x, y)| x != y));
    }

    proptest! {
        /// Feeding the bytes in any split gives the one-shot chain.
        #[test]
        fn incremental_equals_one_shot(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
            chunk in 16u32..300,
        ) {
            let whole = chunk_hashes("model", &bytes, chunk);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut hasher = ChunkHasher::new("model", chunk);
            let mut at = 0;
            for c in cuts {
                hasher.update(&bytes[at..c]);
                at = c;
            }
            hasher.update(&bytes[at..]);
            prop_assert_eq!(hasher.finish(), whole);
        }

        /// Two texts share exactly the hashes of their common full-chunk prefix.
        #[test]
        fn shared_prefix_gives_shared_hashes(
            prefix in proptest::collection::vec(any::<u8>(), 0..1200),
            a in proptest::collection::vec(any::<u8>(), 1..600),
            b in proptest::collection::vec(any::<u8>(), 1..600),
        ) {
            prop_assume!(a[0] != b[0]);
            let chunk = 64u32;
            let mut ta = prefix.clone();
            ta.extend_from_slice(&a);
            let mut tb = prefix.clone();
            tb.extend_from_slice(&b);
            let ha = chunk_hashes("m", &ta, chunk);
            let hb = chunk_hashes("m", &tb, chunk);
            let common = prefix.len() / chunk as usize;
            let shared = ha.iter().zip(&hb).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(shared, common);
        }
    }
}
