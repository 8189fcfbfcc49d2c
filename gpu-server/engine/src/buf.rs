//! Block buffers whose first byte is page-aligned.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Where an [`AlignedBuf`] starts: a multiple of this many bytes.
///
/// The kernel copies a `pread` into user memory with `rep movsb`, which on this project's
/// AMD EPYC test machine runs about 4 times slower into a destination that is not 32-byte
/// aligned (1.7 against 6.5 GB/s from the page cache, `docs/benchmarks.md`), and a large
/// `Vec<u8>` from glibc's `malloc` starts 16 bytes into a page. A page start also suits
/// `O_DIRECT`.
pub(crate) const ALIGN: usize = 4096;

/// A fixed-length, zero-initialised byte buffer whose first byte is [`ALIGN`]-aligned.
pub(crate) struct AlignedBuf {
    /// `len + ALIGN` bytes, never resized, so `start` stays valid when the buffer moves.
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Self { raw, start, len }
    }
}

impl Clone for AlignedBuf {
    /// A new allocation, aligned on its own (the offset into `raw` differs).
    fn clone(&self) -> Self {
        let mut b = Self::zeroed(self.len);
        b.copy_from_slice(self);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_is_aligned_and_stays_so_when_moved_or_cloned() {
        for len in [0, 1, 4096, 368_640] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            let moved = Box::new(b);
            let c = moved.clone();
            for buf in [&*moved, &c] {
                assert_eq!(buf.as_ptr() as usize % ALIGN, 0, "len {len}");
                assert_eq!(buf.len(), len);
                assert!(buf.iter().all(|&x| x == 7));
            }
        }
    }
}
