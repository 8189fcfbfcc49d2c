//! Attention of a few query rows over a host KV pool, reading its f16 blocks in place.
//!
//! The general CPU path copies a sequence's whole context out of the pool for every layer
//! (widened to f32, then transposed into tensors) before two matmuls. For a decode step that
//! copy is most of the work: at 2,000 tokens of context it moves about 70 M floats per token
//! for 2.3 M multiply-adds of attention per layer. Here each block's K (then V) rows are
//! widened once into a small buffer that stays in L1, every query row and head that may see
//! them is scored against them, and nothing else is copied.
//!
//! The context is cut into chunks of whole blocks that run in parallel (rayon); each chunk
//! keeps a softmax of its own (its max, its sum and its weighted V sum, as flash-decoding
//! does) and the chunks are merged per query row and head. Row `i` of a sequence, at position
//! `start + i`, sees positions `0..=start + i` (the causal mask).
//!
//! [`crate::llama::Model::forward`] uses it for sequences running at most [`PAGED_MAX_ROWS`]
//! tokens (decode steps, and the one token a fully cached prompt recomputes); longer prefill
//! chunks keep the matmul path, whose cost the copy does not dominate.

#![allow(unsafe_code)] // AVX2, FMA and F16C intrinsics, used only after runtime detection

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::pool::KvPool;

/// Sequences running at most this many tokens in a step attend here.
pub(crate) const PAGED_MAX_ROWS: usize = 16;

/// Context positions per parallel chunk (rounded to whole blocks).
const CHUNK_TOKENS: usize = 128;

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// One sequence's query rows: rows `row..row + n` of the step, at positions
/// `start..start + n`, whose K and V (these rows' included) are in `blocks`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PagedSeq<'a> {
    pub(crate) blocks: &'a [u32],
    pub(crate) start: usize,
    pub(crate) n: usize,
    pub(crate) row: usize,
}

/// One parallel piece of [`attend`]: positions `lo..hi` of `seq`'s context.
#[derive(Clone, Copy)]
struct Job<'a> {
    pool: &'a KvPool,
    layer: usize,
    shape: Heads,
    q: &'a [f32],
    seq: &'a PagedSeq<'a>,
    lo: usize,
    hi: usize,
}

/// A chunk's softmax state for every (row, head) of its sequence.
struct Partial {
    /// Max score, `-inf` where the row saw nothing of this chunk.
    max: Vec<f32>,
    /// Sum of `exp(score - max)`.
    sum: Vec<f32>,
    /// Sum of `exp(score - max) * v`, `head_dim` values per (row, head).
    acc: Vec<f32>,
}

/// Attention of `layer` for `seqs` over `pool` (a host pool holding their K and V already).
/// `q` holds the step's query rows token-major, `(rows, heads, head_dim)`, already rotated;
/// `out` gets each sequence's rows at the same places, `(rows, heads * head_dim)`; rows of
/// sequences not in `seqs` are left alone. Returns false if a block id is outside the pool or
/// the pool is not in host memory.
pub(crate) fn attend(
    pool: &KvPool,
    layer: usize,
    shape: Heads,
    q: &[f32],
    seqs: &[PagedSeq<'_>],
    out: &mut [f32],
) -> bool {
    attend_on(pool, layer, shape, q, seqs, out, true)
}

/// [`attend`], on this CPU's intrinsics where `simd` and it has them, else in plain Rust.
fn attend_on(
    pool: &KvPool,
    layer: usize,
    shape: Heads,
    q: &[f32],
    seqs: &[PagedSeq<'_>],
    out: &mut [f32],
    simd: bool,
) -> bool {
    let chunk = CHUNK_TOKENS.div_ceil(pool.block_tokens()).max(1) * pool.block_tokens();
    let items: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| {
            let ctx = seq.start + seq.n;
            (0..ctx)
                .step_by(chunk)
                .map(move |lo| (s, lo, (lo + chunk).min(ctx)))
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    let fast = avx2::Avx2::detect().filter(|_| simd && shape.head_dim.is_multiple_of(8));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    let parts: Option<Vec<Partial>> = items
        .par_iter()
        .map(|&(s, lo, hi)| {
            let job = Job {
                pool,
                layer,
                shape,
                q,
                seq: &seqs[s],
                lo,
                hi,
            };
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = fast {
                return simd.chunk(&job);
            }
            chunk_scores(Portable, &job)
        })
        .collect();
    let Some(parts) = parts else {
        return false;
    };
    merge(shape, seqs, &items, &parts, out);
    true
}

/// The inner loops of [`chunk_scores`], in plain Rust or with AVX2 intrinsics.
trait Simd: Copy {
    /// `dst = src` widened to f32.
    fn widen(self, src: &[f16], dst: &mut [f32]);
    /// `q . k[t]` for four rows `k[t]` as long as `q`.
    fn dot4(self, q: &[f32], k: [&[f32]; 4]) -> [f32; 4];
    /// `acc += w[0] * v[0] + ... + w[3] * v[3]` (rows as long as `acc`).
    fn axpy4(self, acc: &mut [f32], w: [f32; 4], v: [&[f32]; 4]);
}

/// Plain Rust (any CPU; the compiler vectorizes the lanes with the baseline's SIMD).
#[derive(Debug, Clone, Copy)]
struct Portable;

impl Simd for Portable {
    #[inline(always)]
    fn widen(self, src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }

    #[inline(always)]
    fn dot4(self, q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        k.map(|k| {
            let mut lanes = [0f32; 8];
            let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
            let tail: f32 = qc
                .remainder()
                .iter()
                .zip(kc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in qc.zip(kc) {
                for l in 0..8 {
                    lanes[l] += a[l] * b[l];
                }
            }
            lanes.iter().sum::<f32>() + tail
        })
    }

    #[inline(always)]
    fn axpy4(self, acc: &mut [f32], w: [f32; 4], v: [&[f32]; 4]) {
        for (d, a) in acc.iter_mut().enumerate() {
            *a += w[0] * v[0][d] + w[1] * v[1][d] + w[2] * v[2][d] + w[3] * v[3][d];
        }
    }
}

/// One chunk: scores against every K row the causal mask lets each query row see, the
/// chunk's softmax, then the weighted sum of V rows.
#[inline(always)]
fn chunk_scores<S: Simd>(simd: S, job: &Job<'_>) -> Option<Partial> {
    let Job {
        pool,
        shape,
        q,
        seq,
        lo,
        hi,
        ..
    } = *job;
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let kv_dim = kv_heads * hd;
    let (n, len) = (seq.n, hi - lo);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut buf = vec![0f32; pool.block_tokens() * kv_dim];
    let mut scores = vec![f32::NEG_INFINITY; n * heads * len];
    visit(simd, job, 0, &mut buf, |i, h, k, at, vis| {
        let q = &q[((seq.row + i) * heads + h) * hd..][..hd];
        let out = &mut scores[(i * heads + h) * len + (at - lo)..][..vis];
        for (j, o) in out.chunks_mut(4).enumerate() {
            let j = 4 * j;
            let at = |t: usize| k.row((j + t).min(j + o.len() - 1));
            let s = simd.dot4(q, [at(0), at(1), at(2), at(3)]);
            for (o, s) in o.iter_mut().zip(s) {
                *o = s * scale;
            }
        }
    })?;
    let mut max = vec![f32::NEG_INFINITY; n * heads];
    let mut sum = vec![0f32; n * heads];
    for (r, row) in scores.chunks_exact_mut(len).enumerate() {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let mut s = 0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            s += *x;
        }
        max[r] = m;
        sum[r] = s;
    }
    let mut acc = vec![0f32; n * heads * hd];
    visit(simd, job, 1, &mut buf, |i, h, v, at, vis| {
        let r = i * heads + h;
        let w = &scores[r * len + (at - lo)..][..vis];
        let acc = &mut acc[r * hd..][..hd];
        for (j, w) in w.chunks(4).enumerate() {
            let j = 4 * j;
            // A short last group weighs its missing rows by zero.
            let wt = |t: usize| w.get(t).copied().unwrap_or(0.0);
            let at = |t: usize| v.row((j + t).min(j + w.len() - 1));
            simd.axpy4(
                acc,
                [wt(0), wt(1), wt(2), wt(3)],
                [at(0), at(1), at(2), at(3)],
            );
        }
    })?;
    Some(Partial { max, sum, acc })
}

/// The K or V rows of one run of positions, widened.
#[derive(Clone, Copy)]
struct Rows<'a> {
    buf: &'a [f32],
    kv_dim: usize,
    /// Where the visited head's KV head starts in a position's row.
    off: usize,
    head_dim: usize,
}

impl Rows<'_> {
    /// The KV head's `head_dim` values of the run's `j`th position.
    #[inline(always)]
    fn row(&self, j: usize) -> &[f32] {
        &self.buf[j * self.kv_dim + self.off..][..self.head_dim]
    }
}

/// For each run of `job`'s positions inside one block, its K (`which` 0) or V (1) rows widened
/// into `buf`, then for every query row `i` and head `h`: `f(i, h, the rows of h's KV head,
/// the run's first position, how many of the run's positions row i sees)`. `None` if a block
/// id is outside the pool.
#[inline(always)]
fn visit<S: Simd>(
    simd: S,
    job: &Job<'_>,
    which: usize,
    buf: &mut [f32],
    mut f: impl FnMut(usize, usize, Rows<'_>, usize, usize),
) -> Option<()> {
    let Job {
        pool,
        layer,
        shape,
        seq,
        lo,
        hi,
        ..
    } = *job;
    let hd = shape.head_dim;
    let kv_dim = shape.kv_heads * hd;
    let group = shape.heads / shape.kv_heads;
    let (data, bt) = (pool.host_data()?, pool.block_tokens());
    let mut at = lo;
    while at < hi {
        let run = (bt - at % bt).min(hi - at);
        let off = pool.offset(seq.blocks, layer, which, at)?;
        simd.widen(&data[off..off + run * kv_dim], &mut buf[..run * kv_dim]);
        for i in 0..seq.n {
            // Row i sits at position start + i and sees every position up to it.
            let vis = (seq.start + i + 1).saturating_sub(at).min(run);
            for h in 0..shape.heads {
                let rows = Rows {
                    buf,
                    kv_dim,
                    off: h / group * hd,
                    head_dim: hd,
                };
                f(i, h, rows, at, vis);
            }
        }
        at += run;
    }
    Some(())
}

/// Merges the chunks of each sequence into its output rows.
fn merge(
    shape: Heads,
    seqs: &[PagedSeq<'_>],
    items: &[(usize, usize, usize)],
    parts: &[Partial],
    out: &mut [f32],
) {
    let (heads, hd) = (shape.heads, shape.head_dim);
    let mut at = 0;
    for (s, seq) in seqs.iter().enumerate() {
        let count = items[at..].iter().take_while(|it| it.0 == s).count();
        let mine = &parts[at..at + count];
        at += count;
        for r in 0..seq.n * heads {
            let m = mine
                .iter()
                .map(|p| p.max[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let dst = &mut out[(seq.row * heads + r) * hd..][..hd];
            dst.fill(0.0);
            let mut total = 0f32;
            for p in mine.iter().filter(|p| p.max[r] != f32::NEG_INFINITY) {
                let w = (p.max[r] - m).exp();
                total += w * p.sum[r];
                for (d, a) in dst.iter_mut().zip(&p.acc[r * hd..(r + 1) * hd]) {
                    *d += w * a;
                }
            }
            // Every row sees at least its own position, so `total` > 0.
            let inv = 1.0 / total;
            dst.iter_mut().for_each(|d| *d *= inv);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Job, Partial, Simd, chunk_scores};

    /// Proof that this CPU has AVX2, FMA and F16C: made only by [`Avx2::detect`].
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Avx2(());

    impl Avx2 {
        pub(super) fn detect() -> Option<Self> {
            let has = |f: bool| f.then_some(Self(()));
            has(is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
        }

        /// [`chunk_scores`] compiled for these features, so the intrinsics inline.
        pub(super) fn chunk(self, job: &Job<'_>) -> Option<Partial> {
            // SAFETY: an `Avx2` exists only where `detect` found the features.
            unsafe { chunk_features(self, job) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn chunk_features(simd: Avx2, job: &Job<'_>) -> Option<Partial> {
        chunk_scores(simd, job)
    }

    // The methods need rows whose length is a multiple of 8 (`attend` checks the head dim)
    // and assert it; each unsafe block loads or stores 8 lanes inside the slices' bounds.
    impl Simd for Avx2 {
        #[inline(always)]
        fn widen(self, src: &[f16], dst: &mut [f32]) {
            assert_eq!(src.len(), dst.len());
            let n = src.len() / 8 * 8;
            for (s, d) in src[..n].chunks_exact(8).zip(dst[..n].chunks_exact_mut(8)) {
                // SAFETY: 8 f16 read from `s`, 8 f32 written to `d`; features as `Avx2`.
                unsafe {
                    let h = _mm_loadu_si128(s.as_ptr().cast());
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            }
            for (s, d) in src[n..].iter().zip(&mut dst[n..]) {
                *d = s.to_f32();
            }
        }

        #[inline(always)]
        fn dot4(self, q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
            assert!(q.len().is_multiple_of(8) && k.iter().all(|k| k.len() == q.len()));
            let mut out = [0f32; 4];
            // SAFETY: loads at `c..c + 8` with `c + 8 <= q.len()`, in every row; features as
            // `Avx2`.
            unsafe {
                let mut a = [_mm256_setzero_ps(); 4];
                for c in (0..q.len()).step_by(8) {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (a, k) in a.iter_mut().zip(&k) {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.as_ptr().add(c)), *a);
                    }
                }
                // [a0 a1 a2 a3] lane sums: two rounds of pairwise adds, then the halves.
                let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                _mm_storeu_ps(out.as_mut_ptr(), r);
            }
            out
        }

        #[inline(always)]
        fn axpy4(self, acc: &mut [f32], w: [f32; 4], v: [&[f32]; 4]) {
            assert!(acc.len().is_multiple_of(8) && v.iter().all(|v| v.len() == acc.len()));
            // SAFETY: loads and the store at `c..c + 8` with `c + 8 <= acc.len()`; features
            // as `Avx2`.
            unsafe {
                let w = w.map(|w| _mm256_set1_ps(w));
                for c in (0..acc.len()).step_by(8) {
                    let p = acc.as_mut_ptr().add(c);
                    let mut x = _mm256_loadu_ps(p);
                    for (w, v) in w.iter().zip(&v) {
                        x = _mm256_fmadd_ps(*w, _mm256_loadu_ps(v.as_ptr().add(c)), x);
                    }
                    _mm256_storeu_ps(p, x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

    use super::*;
    use crate::config::{Arch, ModelConfig};

    fn config(heads: usize, kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 16,
            hidden: heads * head_dim,
            intermediate: 16,
            layers: 2,
            heads,
            kv_heads,
            head_dim,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            context_length: 4096,
            rope_interleaved: false,
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Softmax attention in f64 over K and V as the pool holds them (rounded to f16).
    fn reference(shape: Heads, k: &[f32], v: &[f32], q: &[f32], seq: &PagedSeq<'_>) -> Vec<f32> {
        let Heads {
            heads,
            kv_heads,
            head_dim: hd,
        } = shape;
        let kv_dim = kv_heads * hd;
        let round = |x: f32| f64::from(f16::from_f32(x).to_f32());
        let mut out = vec![0f32; seq.n * heads * hd];
        for i in 0..seq.n {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let qr = &q[((seq.row + i) * heads + h) * hd..][..hd];
                let ctx = seq.start + i + 1;
                let s: Vec<f64> = (0..ctx)
                    .map(|p| {
                        let kr = &k[p * kv_dim + kv * hd..][..hd];
                        let dot: f64 = qr
                            .iter()
                            .zip(kr)
                            .map(|(a, b)| f64::from(*a) * round(*b))
                            .sum();
                        dot / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let total: f64 = e.iter().sum();
                for d in 0..hd {
                    let y: f64 = (0..ctx)
                        .map(|p| e[p] * round(v[p * kv_dim + kv * hd + d]))
                        .sum();
                    out[(i * heads + h) * hd + d] = (y / total) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn paged_attention_equals_softmax_attention() {
        // Contexts of one chunk and of several (merged), a step of one row and of several
        // (causal), blocks in no order, head dims the intrinsics take (64) and not (12).
        for (heads, kv_heads, hd) in [(9, 3, 64), (4, 4, 12), (8, 2, 16)] {
            let cfg = config(heads, kv_heads, hd);
            let shape = Heads {
                heads,
                kv_heads,
                head_dim: hd,
            };
            let kv_dim = cfg.kv_dim();
            let mut pool = KvPool::new(&cfg, 40, 16);
            let blocks: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 40).collect();
            for (start, n) in [(0, 5), (299, 1), (290, 16), (17, 3)] {
                let ctx = start + n;
                let (k, v) = (values(ctx * kv_dim, 1), values(ctx * kv_dim, 2));
                let layer = 1;
                assert!(pool.write(layer, &blocks, 0, &k, &v));
                // Two sequences' rows in one step; this one's are rows 2.. of it.
                let seq = PagedSeq {
                    blocks: &blocks,
                    start,
                    n,
                    row: 2,
                };
                let q = values((n + 2) * heads * hd, 3);
                let want = reference(shape, &k, &v, &q, &seq);
                for simd in [true, false] {
                    let mut out = vec![7f32; (n + 2) * heads * hd];
                    assert!(attend_on(&pool, layer, shape, &q, &[seq], &mut out, simd));
                    let rows = &out[2 * heads * hd..];
                    let d = rows
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        d < 1e-5,
                        "{heads}/{kv_heads}/{hd} at {start}+{n}, simd {simd}: {d}"
                    );
                    assert!(
                        out[..2 * heads * hd].iter().all(|&x| x == 7.0),
                        "other rows written"
                    );
                }
            }
        }
    }

    #[test]
    fn a_block_outside_the_pool_is_refused() {
        let cfg = config(4, 2, 8);
        let pool = KvPool::new(&cfg, 2, 16);
        let shape = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let seq = PagedSeq {
            blocks: &[0, 5],
            start: 20,
            n: 1,
            row: 0,
        };
        let mut out = vec![0f32; 32];
        assert!(!attend(&pool, 0, shape, &values(32, 1), &[seq], &mut out));
    }
}
