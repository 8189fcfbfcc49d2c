//! Q4_1 weights with an AVX2 matmul.
//!
//! candle 0.11 runs the Q4_1 x Q8_1 dot product as scalar code on x86-64 (its AVX2 kernels
//! cover Q4_0, Q8_0 and the k-quants), which made Q4_1 models (the demo model among them)
//! several times slower than llama.cpp. This is llama.cpp's `ggml_vec_dot_q4_1_q8_1` for AVX2
//! over the file's own weights: the same integer products and the same scales, so the logits
//! follow llama.cpp's, only faster. Activations are quantized per 32-value block to Q8_1 exactly
//! as llama.cpp's AVX2 `quantize_row_q8_1` does (scale `amax / 127` rounded to f16, values
//! rounded half to even), and the dot product accumulates in the same order.
//!
//! Used only where the CPU has AVX2, FMA and F16C ([`Q41Matrix::supported`]); elsewhere the weights
//! stay with candle.

#![allow(unsafe_code)] // std::arch intrinsics, called only after runtime feature detection

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::{ModelError, Result};

const QK: usize = 32;

/// One Q4_1 block as GGUF stores it (20 bytes): `w = d * q + m`, `q` in 0..16, low nibbles
/// are values 0..16 of the block, high nibbles 16..32. The scales stay f16 (`dm`: `d` in the
/// low half, `m` in the high half) and are widened as they are used: a decode step streams
/// every block from memory, and f32 scales made that a fifth more bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct WBlock {
    dm: u32,
    qs: [u8; QK / 2],
}

impl WBlock {
    /// `(d, m)` in f32 (portable; the AVX2 kernels widen with F16C).
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    fn scales(&self) -> (f32, f32) {
        let half = |bits: u32| f16::from_bits(bits as u16).to_f32();
        (half(self.dm), half(self.dm >> 16))
    }
}

/// One Q8_1 block of activations: `x = d * q`; `s = d * sum(q)` (both rounded through f16, as
/// llama.cpp stores them).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct XBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

const X_ZERO: XBlock = XBlock {
    d: 0.0,
    s: 0.0,
    qs: [0; QK],
};

/// A `(n, k)` Q4_1 weight; [`Q41Matrix::matmul`] computes `x @ w^T`.
#[derive(Debug)]
pub(crate) struct Q41Matrix {
    n: usize,
    k: usize,
    blocks: Vec<WBlock>,
}

impl Q41Matrix {
    /// Whether this CPU runs the kernel (x86-64 with AVX2, FMA and F16C).
    pub(crate) fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Takes a 2-D Q4_1 tensor of shape `(n, k)`; `None` for any other type or shape, or where
    /// this CPU cannot run the kernel.
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let dims = t.shape().dims();
        if !Self::supported()
            || t.dtype() != GgmlDType::Q4_1
            || dims.len() != 2
            || !dims[1].is_multiple_of(QK)
        {
            return Ok(None);
        }
        let (n, k) = (dims[0], dims[1]);
        let raw = t.data()?;
        // GGUF layout of a block: f16 d, f16 m, 16 bytes of nibbles.
        const RAW: usize = 4 + QK / 2;
        if raw.len() != n * k / QK * RAW {
            return Err(ModelError::Metadata(format!(
                "Q4_1 tensor of {} bytes for shape ({n}, {k})",
                raw.len()
            )));
        }
        let blocks = raw
            .chunks_exact(RAW)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..]);
                WBlock {
                    dm: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    qs,
                }
            })
            .collect();
        Ok(Some(Self { n, k, blocks }))
    }

    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `x` is `(m, k)` row-major; returns `x @ w^T`, `(m, n)` row-major.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&QRows::new(x, m, self.k))
    }

    /// `x @ w^T`, `(m, n)` row-major, for activations already quantized ([`QRows`]), so that
    /// projections of one input (q, k and v; gate and up) quantize it once.
    pub(crate) fn matmul_quantized(&self, x: &QRows) -> Vec<f32> {
        let (m, n, kb) = (x.m, self.n, self.k / QK);
        assert_eq!(x.kb, kb, "activations of another width");
        // Work items are runs of ROWS weight rows (a few KB: they stay in L1). Within an item,
        // each quad of activation rows is loaded once and dotted with every weight row of the
        // item, so the activations stream from L2 once per item rather than once per weight
        // row. Each item writes its own columns of every output row, in place: no transpose
        // after the parallel loop, where one core would wait for the other.
        const ROWS: usize = 8;
        let mut out = vec![0f32; m * n];
        let dst = Columns(out.as_mut_ptr());
        let quads = m / 4;
        (0..n.div_ceil(ROWS)).into_par_iter().for_each(|item| {
            let first = item * ROWS;
            let rows = ROWS.min(n - first);
            let w = |r: usize| &self.blocks[(first + r) * kb..(first + r + 1) * kb];
            let x = |i: usize| &x.blocks[i * kb..(i + 1) * kb];
            // SAFETY (every `put`): `i < m` and `first + r < n`, so the index is inside the
            // `m * n` output, which outlives the loop; items own disjoint columns
            // `first..first + rows`, so no two threads write one element.
            let put = |i: usize, r: usize, v: f32| unsafe { dst.put(i * n + first + r, v) };
            for q in 0..quads {
                let xs = [x(4 * q), x(4 * q + 1), x(4 * q + 2), x(4 * q + 3)];
                for r in 0..rows {
                    for (j, v) in dot4(w(r), xs).into_iter().enumerate() {
                        put(4 * q + j, r, v);
                    }
                }
            }
            for i in 4 * quads..m {
                for r in 0..rows {
                    put(i, r, dot(w(r), x(i)));
                }
            }
        });
        out
    }
}

/// The output of [`Q41Matrix::matmul_quantized`], written by its parallel work items, each into
/// its own columns.
#[derive(Clone, Copy)]
struct Columns(*mut f32);

// SAFETY: shared only inside `matmul_quantized`, whose items write disjoint elements.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// `at` is inside the buffer, and no other thread reads or writes that element meanwhile.
    unsafe fn put(self, at: usize, v: f32) {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(at).write(v) }
    }
}

/// `m` rows of activations quantized to Q8_1 for a Q4_1 weight `k` wide.
#[derive(Debug)]
pub(crate) struct QRows {
    m: usize,
    kb: usize,
    blocks: Vec<XBlock>,
}

impl QRows {
    /// Quantizes `x`, `(m, k)` row-major.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(QK) && x.len() == m * k,
            "({m}, {k}) activations"
        );
        let kb = k / QK;
        let mut blocks = vec![X_ZERO; m * kb];
        for (row, q) in x.chunks_exact(k).zip(blocks.chunks_exact_mut(kb)) {
            quantize(row, q);
        }
        Self { m, kb, blocks }
    }

    pub(crate) fn rows(&self) -> usize {
        self.m
    }
}

fn quantize(x: &[f32], out: &mut [XBlock]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as in `dot`.
        unsafe { avx2::quantize_row(x, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        quantize_row(x, out)
    }
}

/// llama.cpp's `quantize_row_q8_1` (AVX2 variant): `d = amax / 127`, `q = round_even(x * 127 /
/// amax)`, `s = d * sum(q)`; `d` and `s` stored as f16.
#[inline(always)]
fn quantize_row(x: &[f32], out: &mut [XBlock]) {
    for (xs, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in y.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        y.d = f16::from_f32(d).to_f32();
        y.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

fn dot(w: &[WBlock], x: &[XBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a `Q41Matrix` exists only where `supported()` found AVX2, FMA and F16C
        // (`from_qtensor`); the slices' lengths are checked inside.
        unsafe { avx2::dot(w, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        dot_scalar(w, x)
    }
}

/// [`dot`] of one weight row with four activation rows.
fn dot4(w: &[WBlock], x: [&[XBlock]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as in `dot`.
        unsafe { avx2::dot4(w, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        x.map(|x| dot_scalar(w, x))
    }
}

/// The same sum in plain Rust (the reference for the AVX2 version; candle's scalar code).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn dot_scalar(w: &[WBlock], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (b.qs[j] & 0x0F) as i32 * y.qs[j] as i32;
            sumi += (b.qs[j] >> 4) as i32 * y.qs[j + QK / 2] as i32;
        }
        let (d, m) = b.scales();
        acc += sumi as f32 * d * y.d + m * y.s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QK, WBlock, XBlock};

    /// A block's `(d, m)`, widened from f16 in one instruction.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales(b: &WBlock) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(b.dm as i32));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// llama.cpp's `ggml_vec_dot_q4_1_q8_1`, AVX2 branch.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(w: &[WBlock], x: &[XBlock]) -> f32 {
        assert_eq!(w.len(), x.len());
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (b, y) in w.iter().zip(x) {
            let (d, m) = scales(b);
            summs += m * y.s;
            // SAFETY: `qs` are 16 and 32 bytes long; unaligned loads.
            let (nib, qy) = unsafe {
                (
                    _mm_loadu_si128(b.qs.as_ptr().cast()),
                    _mm256_loadu_si256(y.qs.as_ptr().cast()),
                )
            };
            // Low nibbles are values 0..16, high nibbles 16..32.
            let qx = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(nib, 4), nib));
            let pairs = _mm256_maddubs_epi16(qx, qy);
            let xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), xy, acc);
        }
        hsum(acc) + summs
    }

    /// [`dot`] against four activation rows; each weight block is unpacked once. Every row's
    /// sum is formed in the same order as `dot` forms it, so results are bit-identical.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4(w: &[WBlock], x: [&[XBlock]; 4]) -> [f32; 4] {
        for r in &x {
            assert_eq!(w.len(), r.len());
        }
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for (k, b) in w.iter().enumerate() {
            let (d, m) = scales(b);
            // SAFETY: `qs` is 16 bytes long; unaligned load.
            let nib = unsafe { _mm_loadu_si128(b.qs.as_ptr().cast()) };
            let qx = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(nib, 4), nib));
            for r in 0..4 {
                let y = &x[r][k];
                summs[r] += m * y.s;
                // SAFETY: `qs` is 32 bytes long; unaligned load.
                let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
                let pairs = _mm256_maddubs_epi16(qx, qy);
                let xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), xy, acc[r]);
            }
        }
        [0, 1, 2, 3].map(|r| hsum(acc[r]) + summs[r])
    }

    /// `super::quantize_row` compiled with AVX2, where rounding half to even is one
    /// instruction instead of a libm call per value.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn quantize_row(x: &[f32], out: &mut [XBlock]) {
        super::quantize_row(x, out)
    }

    /// ggml's `hsum_float_8`.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    const _: () = assert!(QK == 32);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    }

    #[test]
    fn avx2_dot_equals_the_scalar_sum() {
        if !Q41Matrix::supported() {
            eprintln!("SKIPPED: this CPU has no AVX2/FMA; the kernel is not used here");
            return;
        }
        let w = Tensor::from_vec(random(3, 256, 1), (3, 256), &Device::Cpu).unwrap();
        let q = Q41Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
            .unwrap()
            .unwrap();
        let mut xq = vec![X_ZERO; 8];
        quantize_row(&random(1, 256, 2), &mut xq);
        for j in 0..3 {
            let wb = &q.blocks[j * 8..(j + 1) * 8];
            let (a, b) = (dot(wb, &xq), dot_scalar(wb, &xq));
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Four rows at once: bit-identical to one at a time.
        let rows: Vec<Vec<XBlock>> = (0..4)
            .map(|r| {
                let mut xq = vec![X_ZERO; 8];
                quantize_row(&random(1, 256, 10 + r), &mut xq);
                xq
            })
            .collect();
        let wb = &q.blocks[..8];
        let four = dot4(wb, [&rows[0], &rows[1], &rows[2], &rows[3]]);
        for r in 0..4 {
            assert_eq!(four[r].to_bits(), dot(wb, &rows[r]).to_bits());
        }
    }

    #[test]
    fn matmul_is_within_the_activation_rounding_of_the_exact_product() {
        if !Q41Matrix::supported() {
            eprintln!("SKIPPED: this CPU has no AVX2/FMA; the kernel is not used here");
            return;
        }
        let (n, k) = (42, 128); // n not a multiple of the 8-row work items
        let w = Tensor::from_vec(random(n, k, 3), (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q41Matrix::from_qtensor(&qt).unwrap().unwrap();
        assert_eq!(ours.dims(), (n, k));
        // The weights exactly as stored, in f32.
        let wq = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let candle = QMatMul::from_qtensor(qt).unwrap();
        for m in [1, 5, 8, 13] {
            let x = random(m, k, 4 + m as u64);
            let theirs = candle
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = ours.matmul(&x, m);
            assert_eq!(got.len(), m * n);
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                for j in 0..n {
                    let exact: f32 = wq[j].iter().zip(xr).map(|(a, b)| a * b).sum();
                    // Each activation is rounded to a step of its block's amax / 127: at most
                    // half a step per value (plus f16 rounding of the scales).
                    let bound: f32 = wq[j]
                        .chunks(QK)
                        .zip(xr.chunks(QK))
                        .map(|(wb, xb)| {
                            let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                            wb.iter().map(|v| v.abs()).sum::<f32>() * step * 0.51
                        })
                        .sum::<f32>()
                        + 1e-3;
                    let (g, c) = (got[i * n + j], theirs[i * n + j]);
                    assert!(
                        (g - exact).abs() <= bound,
                        "ours {g}, exact {exact}, bound {bound}"
                    );
                    // candle's scalar Q4_1 matmul is held to the same bound (the two quantize
                    // activations the same way up to ties and scale rounding).
                    assert!((c - exact).abs() <= bound, "candle {c}, exact {exact}");
                }
            }
        }
    }

    #[test]
    fn other_types_and_shapes_are_left_to_candle() {
        let w = Tensor::from_vec(random(4, 64, 5), (4, 64), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q8).unwrap().is_none());
    }
}
