//! XXH3-64 (seed 0, the default secret) of a block, optionally computed while the block is
//! copied: one pass that loads each 32 bytes once, stores them to the destination and feeds
//! them to the hash, instead of a copy and then a hash over the copy.
//!
//! Why not a crate: `twox-hash` and `xxhash-rust` hash a buffer that is already in place, so
//! a disk read that must both copy a block out of the page cache and check its checksum made
//! two passes over 368 KB (the hash, at about 30 GB/s, then cost about a third of the copy).
//! Fused, the hash's arithmetic runs while the copy waits on memory. The values are plain
//! XXH3-64 (tested against `xxhash-rust` at every length class), so nothing on disk depends
//! on this implementation.
//!
//! The long-input algorithm (inputs over 240 bytes; shorter ones go to `xxhash-rust`):
//! 8 accumulators take 64-byte stripes, 16 stripes a 1,024-byte block, scrambled after each
//! block; then the stripes of the last partial block, the input's last 64 bytes, and a merge.
//! AVX2 where the CPU has it (detected at run time), else the same in scalar `u64`s.
#![allow(unsafe_code)] // AVX2 intrinsics after run-time detection; copies through raw pointers

const STRIPE: usize = 64;
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
/// Inputs up to this long use XXH3's short-input algorithms.
const MID_SIZE_MAX: usize = 240;
const SCRAMBLE_AT: usize = SECRET.len() - STRIPE;
const LAST_STRIPE_AT: usize = SECRET.len() - STRIPE - 7;
const MERGE_AT: usize = 11;

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
const INIT_ACC: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

/// XXH3's default secret (the specification's `kSecret`).
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// XXH3-64 of `data`.
pub(crate) fn xxh3(data: &[u8]) -> u64 {
    if data.len() <= MID_SIZE_MAX {
        return xxhash_rust::xxh3::xxh3_64(data);
    }
    // SAFETY: `data` is `data.len()` readable bytes; no destination.
    unsafe { long(data.as_ptr(), std::ptr::null_mut(), data.len(), avx2()) }
}

/// Copies `dst.len()` bytes from `src` into `dst` and returns their XXH3-64, in one pass.
/// The value is the hash of the bytes written to `dst` (each is loaded once), even if the
/// source changes meanwhile.
///
/// # Safety
/// `src` must point at `dst.len()` readable bytes that do not overlap `dst`.
pub(crate) unsafe fn copy_xxh3(src: *const u8, dst: &mut [u8]) -> u64 {
    if dst.len() <= MID_SIZE_MAX {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        return xxhash_rust::xxh3::xxh3_64(dst);
    }
    // SAFETY: the caller's contract; `dst` is writable for its length.
    unsafe { long(src, dst.as_mut_ptr(), dst.len(), avx2()) }
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The long-input hash of `len` (> 240) bytes at `src`, storing them at `dst` unless it is
/// null.
///
/// # Safety
/// `src` readable and `dst` (if not null) writable for `len` bytes, not overlapping; `avx2`
/// only if the CPU has AVX2.
unsafe fn long(src: *const u8, dst: *mut u8, len: usize, avx2: bool) -> u64 {
    debug_assert!(len > MID_SIZE_MAX);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 was detected; the caller's ranges.
        let acc = unsafe {
            if dst.is_null() {
                x86::accumulate::<false>(src, dst, len)
            } else {
                x86::accumulate::<true>(src, dst, len)
            }
        };
        return merge(&acc, len);
    }
    let _ = avx2;
    // SAFETY: the caller's ranges.
    let acc = unsafe { accumulate_scalar(src, dst, len) };
    merge(&acc, len)
}

fn secret_u64(at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&SECRET[at..at + 8]);
    u64::from_le_bytes(b)
}

fn merge(acc: &[u64; 8], len: usize) -> u64 {
    let mut h = (len as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let a = acc[2 * i] ^ secret_u64(MERGE_AT + 16 * i);
        let b = acc[2 * i + 1] ^ secret_u64(MERGE_AT + 16 * i + 8);
        let p = u128::from(a) * u128::from(b);
        h = h.wrapping_add(p as u64 ^ (p >> 64) as u64);
    }
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// The stripe loop in scalar `u64`s; a copy, if any, is made block by block first and the
/// hash reads the copy (so it hashes what was written).
///
/// # Safety
/// As [`long`].
unsafe fn accumulate_scalar(src: *const u8, dst: *mut u8, len: usize) -> [u64; 8] {
    let copy = |at: usize, n: usize| -> *const u8 {
        if dst.is_null() {
            // SAFETY: `at + n <= len`.
            unsafe { src.add(at) }
        } else {
            // SAFETY: `at + n <= len`, the ranges do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), n);
                dst.add(at)
            }
        }
    };
    let stripe = |acc: &mut [u64; 8], p: *const u8, key_at: usize| {
        for i in 0..8 {
            let mut b = [0u8; 8];
            // SAFETY: `p` points at a 64-byte stripe inside the input.
            unsafe { std::ptr::copy_nonoverlapping(p.add(8 * i), b.as_mut_ptr(), 8) };
            let v = u64::from_le_bytes(b);
            let k = v ^ secret_u64(key_at + 8 * i);
            acc[i ^ 1] = acc[i ^ 1].wrapping_add(v);
            acc[i] = acc[i].wrapping_add((k & 0xFFFF_FFFF) * (k >> 32));
        }
    };
    let mut acc = INIT_ACC;
    let blocks = (len - 1) / BLOCK;
    for b in 0..blocks {
        let p = copy(b * BLOCK, BLOCK);
        for s in 0..STRIPES_PER_BLOCK {
            // SAFETY: stripe `s` of a whole block.
            stripe(&mut acc, unsafe { p.add(s * STRIPE) }, s * 8);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let v = (*a ^ (*a >> 47)) ^ secret_u64(SCRAMBLE_AT + 8 * i);
            *a = v.wrapping_mul(PRIME32_1);
        }
    }
    let base = blocks * BLOCK;
    let stripes = (len - 1 - base) / STRIPE;
    // The rest from `base`: the partial block's stripes and the last stripe cover it.
    let p = copy(base, len - base);
    for s in 0..stripes {
        // SAFETY: stripe `s` of the partial block lies before `len`.
        stripe(&mut acc, unsafe { p.add(s * STRIPE) }, s * 8);
    }
    // SAFETY: `p + (len - base)` is the input's end and `len > 64`; every byte before it has
    // been copied (or is the source).
    let last = unsafe { p.add(len - base).sub(STRIPE) };
    stripe(&mut acc, last, LAST_STRIPE_AT);
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{
        BLOCK, INIT_ACC, LAST_STRIPE_AT, PRIME32_1, SCRAMBLE_AT, SECRET, STRIPE, STRIPES_PER_BLOCK,
    };

    /// The stripe loop in AVX2: each 32 bytes loaded once, stored to `dst` if `COPY`, and
    /// accumulated.
    ///
    /// # Safety
    /// AVX2 present; `src` readable and (if `COPY`) `dst` writable for `len` bytes, `len` >
    /// 240, not overlapping.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn accumulate<const COPY: bool>(
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> [u64; 8] {
        let key = |at: usize| -> __m256i {
            // SAFETY: every `at` used below is at most 192 - 32.
            unsafe { _mm256_loadu_si256(SECRET.as_ptr().add(at).cast()) }
        };
        // SAFETY (whole body): offsets stay below `len` per the caller's contract.
        unsafe {
            let mut acc = [
                _mm256_loadu_si256(INIT_ACC.as_ptr().cast()),
                _mm256_loadu_si256(INIT_ACC.as_ptr().add(4).cast()),
            ];
            macro_rules! stripe {
                ($at:expr, $key_at:expr) => {
                    for k in 0..2 {
                        let off = $at + 32 * k;
                        let d = _mm256_loadu_si256(src.add(off).cast());
                        if COPY {
                            _mm256_storeu_si256(dst.add(off).cast(), d);
                        }
                        let dk = _mm256_xor_si256(d, key($key_at + 32 * k));
                        let product = _mm256_mul_epu32(dk, _mm256_srli_epi64::<32>(dk));
                        let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(d);
                        acc[k] = _mm256_add_epi64(product, _mm256_add_epi64(acc[k], swapped));
                    }
                };
            }
            let prime = _mm256_set1_epi32(PRIME32_1 as i32);
            let blocks = (len - 1) / BLOCK;
            for b in 0..blocks {
                for s in 0..STRIPES_PER_BLOCK {
                    stripe!(b * BLOCK + s * STRIPE, s * 8);
                }
                for (k, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a));
                    let dk = _mm256_xor_si256(v, key(SCRAMBLE_AT + 32 * k));
                    let lo = _mm256_mul_epu32(dk, prime);
                    let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(dk), prime);
                    *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
                }
            }
            let base = blocks * BLOCK;
            for s in 0..(len - 1 - base) / STRIPE {
                stripe!(base + s * STRIPE, s * 8);
            }
            // The last 64 bytes (overlapping stripes already taken: stored again, same bytes).
            stripe!(len - STRIPE, LAST_STRIPE_AT);
            let mut out = [0u64; 8];
            _mm256_storeu_si256(out.as_mut_ptr().cast(), acc[0]);
            _mm256_storeu_si256(out.as_mut_ptr().add(4).cast(), acc[1]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).rotate_left(i % 29) as u8)
            .collect()
    }

    /// Every length class: short (xxhash-rust's), just over 240, around stripe and block
    /// edges, and disk-block sizes.
    const LENGTHS: &[usize] = &[
        0, 1, 17, 128, 240, 241, 255, 256, 257, 319, 320, 321, 1023, 1024, 1025, 1087, 1088, 1089,
        2048, 2049, 4096, 16_385, 368_640, 368_641,
    ];

    #[test]
    fn the_hash_is_plain_xxh3_at_every_length_with_and_without_a_copy() {
        for &len in LENGTHS {
            let src = data(len, len as u32);
            let want = xxhash_rust::xxh3::xxh3_64(&src);
            assert_eq!(xxh3(&src), want, "len {len}");
            let mut dst = vec![0xAAu8; len];
            // SAFETY: `src` holds `len` bytes, apart from `dst`.
            assert_eq!(
                unsafe { copy_xxh3(src.as_ptr(), &mut dst) },
                want,
                "len {len}"
            );
            assert_eq!(dst, src, "copy of len {len}");
        }
    }

    #[test]
    fn the_scalar_and_avx2_paths_agree_with_xxh3() {
        for &len in LENGTHS.iter().filter(|&&l| l > MID_SIZE_MAX) {
            let src = data(len, 7);
            let want = xxhash_rust::xxh3::xxh3_64(&src);
            let paths: &[bool] = if avx2() { &[false, true] } else { &[false] };
            for &avx in paths {
                let mut dst = vec![0u8; len];
                // SAFETY: ranges as `long` requires; AVX2 only where detected.
                unsafe {
                    assert_eq!(long(src.as_ptr(), std::ptr::null_mut(), len, avx), want);
                    assert_eq!(long(src.as_ptr(), dst.as_mut_ptr(), len, avx), want);
                }
                assert_eq!(dst, src, "len {len} avx2 {avx}");
            }
        }
    }
}
