//! The placement board: where the worker VMs of one Envoy tell each other
//! which replica they placed a new prefix on, and where they sent a request
//! that is mostly its own prompt.
//!
//! Each Envoy worker runs its own VM with its own policy state. A prefix no
//! replica holds yet is invisible to the other VMs until its replica reports
//! the first sealed blocks (seconds, on a slow prefill), and in that window a
//! second VM would place the same prefix again, somewhere else, or place a
//! different new prefix on the same replica not knowing it is taken. Likewise
//! a VM that balances the prefill of long, mostly uncached requests across
//! replicas sees only the ones it routed itself, half of them or fewer. The
//! board is one small shared-data value per pool
//! ([`crate::state::board_key`]): the last [`Board::CAPACITY`] decisions,
//! each with a sequence number. A filter reads it before deciding, feeds the
//! entries it has not seen to its policy, and appends the decision its
//! policy shares ([`crate::policy::Policy::shares`]) with a compare-and-swap;
//! on a CAS mismatch it reads again and decides again, so two VMs placing
//! the same prefix at once end up agreeing.
//!
//! The encoding is little-endian `u64` words: version, next sequence number,
//! entry count, then per entry: sequence number, replica key, time decided
//! (ms since the Unix epoch), total chunks of the request, own chunks (those
//! past the prefix the replica had cached), 1 for a placement of a new prefix
//! or 0, chunks kept, and the kept chunk hashes (at most
//! [`Board::MAX_CHUNKS`], from the first). A board of another version reads
//! as an error (a filter then treats it as empty and its next push replaces
//! it).

use std::collections::VecDeque;

const VERSION: u64 = 2;

/// One shared decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Board sequence number (from 1).
    pub seq: u64,
    /// [`crate::snapshot::Replica::key`] of the replica it went to.
    pub replica_key: u64,
    /// When it was decided, ms since the Unix epoch.
    pub at_ms: u64,
    /// Chunks of the request (all of them, not only the kept).
    pub total_chunks: u32,
    /// Chunks past the prefix the replica had cached: what it computes.
    pub own_chunks: u32,
    /// A new prefix placed (rather than a request sent where it was known).
    pub placed: bool,
    /// The first chunk hashes of the request.
    pub chunks: Vec<u64>,
}

/// A decision to share, as [`Board::push`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    /// [`crate::snapshot::Replica::key`] of the replica it went to.
    pub replica_key: u64,
    /// When it was decided, ms since the Unix epoch.
    pub at_ms: u64,
    /// The request's chunk hashes, all of them.
    pub chunks: &'a [u64],
    /// Chunks past the prefix the replica had cached.
    pub own_chunks: u32,
    /// A new prefix placed.
    pub placed: bool,
}

/// The last shared decisions of a pool, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Board {
    next_seq: u64,
    entries: VecDeque<Entry>,
}

/// A board value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable placement board ({0})")]
pub struct BoardError(&'static str);

impl Board {
    /// Decisions kept.
    pub const CAPACITY: usize = 32;
    /// Chunk hashes kept per placement.
    pub const MAX_CHUNKS: usize = 16;

    /// Decodes a board value.
    pub fn decode(bytes: &[u8]) -> Result<Board, BoardError> {
        if !bytes.len().is_multiple_of(8) {
            return Err(BoardError("length"));
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        let mut next = || words.next().ok_or(BoardError("truncated"));
        if next()? != VERSION {
            return Err(BoardError("version"));
        }
        let next_seq = next()?;
        let count = next()?;
        if count > Self::CAPACITY as u64 {
            return Err(BoardError("count"));
        }
        let mut entries = VecDeque::with_capacity(count as usize);
        for _ in 0..count {
            let (seq, replica_key, at_ms) = (next()?, next()?, next()?);
            let total_chunks = u32::try_from(next()?).map_err(|_| BoardError("chunks"))?;
            let own_chunks = u32::try_from(next()?).map_err(|_| BoardError("chunks"))?;
            let placed = match next()? {
                0 => false,
                1 => true,
                _ => return Err(BoardError("kind")),
            };
            let kept = next()?;
            if kept > Self::MAX_CHUNKS as u64 {
                return Err(BoardError("chunks"));
            }
            let chunks = (0..kept).map(|_| next()).collect::<Result<_, _>>()?;
            entries.push_back(Entry {
                seq,
                replica_key,
                at_ms,
                total_chunks,
                own_chunks,
                placed,
                chunks,
            });
        }
        Ok(Board { next_seq, entries })
    }

    /// The value to store.
    pub fn encode(&self) -> Vec<u8> {
        let mut words = vec![VERSION, self.next_seq, self.entries.len() as u64];
        for e in &self.entries {
            words.extend([
                e.seq,
                e.replica_key,
                e.at_ms,
                u64::from(e.total_chunks),
                u64::from(e.own_chunks),
                u64::from(e.placed),
                e.chunks.len() as u64,
            ]);
            words.extend(&e.chunks);
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Appends a decision (dropping the oldest past [`Board::CAPACITY`]);
    /// returns its sequence number.
    pub fn push(&mut self, d: Decision<'_>) -> u64 {
        self.next_seq = self.next_seq.max(1);
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() == Self::CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            seq,
            replica_key: d.replica_key,
            at_ms: d.at_ms,
            total_chunks: u32::try_from(d.chunks.len()).unwrap_or(u32::MAX),
            own_chunks: d.own_chunks,
            placed: d.placed,
            chunks: d.chunks.iter().take(Self::MAX_CHUNKS).copied().collect(),
        });
        seq
    }

    /// Decisions after sequence number `seen`, oldest first.
    pub fn since(&self, seen: u64) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.seq > seen)
    }

    /// The newest sequence number (0 for an empty board).
    pub fn last_seq(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.seq)
    }

    /// Number of decisions held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no decision is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn round_trips_and_keeps_the_newest() {
        let mut b = Board::default();
        assert_eq!(Board::decode(&b.encode()), Ok(b.clone()));
        let long: Vec<u64> = (0..40).collect();
        for i in 0..(Board::CAPACITY as u64 + 5) {
            let chunks = &long[..(i as usize % 40)];
            let d = Decision {
                replica_key: i % 3,
                at_ms: 1_000 + i,
                chunks,
                own_chunks: chunks.len() as u32 / 2,
                placed: i % 2 == 0,
            };
            assert_eq!(b.push(d), i + 1);
        }
        assert_eq!(b.len(), Board::CAPACITY);
        assert_eq!(b.last_seq(), Board::CAPACITY as u64 + 5);
        let oldest = b.since(0).next().unwrap();
        assert_eq!(oldest.seq, 6);
        let newest = b.since(b.last_seq() - 1).collect::<Vec<_>>();
        assert_eq!(newest.len(), 1);
        // 36 chunks asked, 16 kept, the count stays.
        assert_eq!(newest[0].total_chunks, 36);
        assert_eq!(newest[0].own_chunks, 18);
        assert!(newest[0].placed);
        assert_eq!(newest[0].chunks, (0..16).collect::<Vec<u64>>());
        let back = Board::decode(&b.encode()).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.since(30).count(), 7);
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        assert!(Board::decode(&[1, 2, 3]).is_err());
        assert!(Board::decode(&[]).is_err());
        let mut b = Board::default();
        b.push(Decision {
            replica_key: 1,
            at_ms: 2,
            chunks: &[3, 4],
            own_chunks: 2,
            placed: true,
        });
        let bytes = b.encode();
        assert!(Board::decode(&bytes[..bytes.len() - 8]).is_err());
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(Board::decode(&other).is_err());
        // The placed flag is 0 or 1 (word 8 from 0: version, next, count,
        // then the entry's seq, key, time, total and own before it).
        let mut kind = bytes.clone();
        kind[8 * 8] = 2;
        assert_eq!(Board::decode(&kind), Err(BoardError("kind")));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Board::decode(&bytes);
        }
    }
}
