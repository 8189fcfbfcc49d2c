//! kvmesh's decode kernels (`src/kernels.cu`, built to PTX by build.rs) on candle's CUDA
//! tensors. A decode step launched one candle op at a time is ~30 launches a layer, and at
//! batch 1 their cost, not the weights' bytes, sets the step time; with these a layer is seven:
//! four matrix-vector products over the weights (q|k|v and gate|up fused at load, carrying rope
//! with the KV write and the gated unit in their epilogues), attention, and the two residuals
//! each fused with the norm after it.

// Launching a kernel and allocating the tensor it fills are unsafe in cudarc; each use states
// why its arguments are the kernel's.
#![allow(unsafe_code)]

use std::sync::Arc;

use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;

use crate::config::ModelConfig;
use crate::{ModelError, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// Positions an attention block takes (kernels.cu's `CHUNK`).
const CHUNK: usize = 256;
/// Query heads a KV head may serve (kernels.cu's `MAXG`).
const MAXG: usize = 8;
/// Rows a matrix-vector product takes at once (kernels.cu's `gemv_*_1..8`); more go to cuBLAS.
pub(crate) const GEMV_ROWS: usize = 8;
const THREADS: u32 = 256;

fn err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Forward(format!("{what}: {e}"))
}

/// The kernels of one activation type.
struct Funcs {
    gemv: Vec<CudaFunction>,
    gemv_glu: Vec<CudaFunction>,
    gemv_qkv_rope: Vec<CudaFunction>,
    rope_write: CudaFunction,
    attention_chunk: CudaFunction,
    attention_merge: CudaFunction,
    silu_mul: CudaFunction,
    add_rms_norm: CudaFunction,
}

impl Funcs {
    fn load(dev: &CudaDevice, suffix: &str) -> Result<Self> {
        let load = |name: String| -> Result<CudaFunction> {
            Ok(dev
                .get_or_load_custom_func(&name, "kvmesh", PTX)?
                .into_cuda_function())
        };
        let f = |name: &str| load(format!("{name}_{suffix}"));
        Ok(Self {
            gemv: (1..=GEMV_ROWS)
                .map(|b| load(format!("gemv_{suffix}_{b}")))
                .collect::<Result<_>>()?,
            gemv_glu: (1..=GEMV_ROWS)
                .map(|b| load(format!("gemv_glu_{suffix}_{b}")))
                .collect::<Result<_>>()?,
            gemv_qkv_rope: (1..=GEMV_ROWS)
                .map(|b| load(format!("gemv_qkv_rope_{suffix}_{b}")))
                .collect::<Result<_>>()?,
            rope_write: f("rope_write")?,
            attention_chunk: f("attention_chunk")?,
            attention_merge: f("attention_merge")?,
            silu_mul: f("silu_mul")?,
            add_rms_norm: f("add_rms_norm")?,
        })
    }
}

/// The loaded kernels and the stream candle runs the model on.
pub(crate) struct Kernels {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    f16: Funcs,
    f32: Funcs,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("dev", &self.dev).finish()
    }
}

/// The address of a contiguous CUDA tensor's first element.
fn ptr(t: &Tensor) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(ModelError::Forward("kernel input not contiguous".into()));
    }
    let Storage::Cuda(cs) = &*st else {
        return Err(ModelError::Forward(
            "kernel input not on a CUDA device".into(),
        ));
    };
    let stream = cs.device.cuda_stream();
    // The address is fixed for the tensor's life; the guards only order this read.
    let base = match t.dtype() {
        DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(&stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        d => return Err(ModelError::Forward(format!("kernel input of type {d:?}"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

impl Kernels {
    pub(crate) fn new(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            dev: dev.clone(),
            stream: dev.cuda_stream(),
            f16: Funcs::load(dev, "f16")?,
            f32: Funcs::load(dev, "f32")?,
        })
    }

    /// Whether the decode kernels serve a model of this shape with activations of `act`.
    pub(crate) fn serve(cfg: &ModelConfig, act: DType) -> bool {
        let d = cfg.head_dim;
        matches!(act, DType::F16 | DType::F32)
            && d.is_multiple_of(2)
            && d <= 256
            && cfg.kv_heads > 0
            && cfg.heads.is_multiple_of(cfg.kv_heads)
            && cfg.heads / cfg.kv_heads <= MAXG
    }

    fn funcs(&self, dtype: DType) -> Result<&Funcs> {
        match dtype {
            DType::F16 => Ok(&self.f16),
            DType::F32 => Ok(&self.f32),
            d => Err(ModelError::Forward(format!("no decode kernels for {d:?}"))),
        }
    }

    /// An uninitialized tensor for a kernel to fill, and its address.
    fn empty(&self, dtype: DType, shape: &[usize]) -> Result<(Tensor, u64)> {
        let n = shape.iter().product();
        // SAFETY: every element is written by the kernel the tensor is made for.
        let storage = match dtype {
            DType::F16 => {
                CudaStorage::wrap_cuda_slice(unsafe { self.dev.alloc::<f16>(n)? }, self.dev.clone())
            }
            DType::F32 => {
                CudaStorage::wrap_cuda_slice(unsafe { self.dev.alloc::<f32>(n)? }, self.dev.clone())
            }
            d => return Err(ModelError::Forward(format!("kernel output of type {d:?}"))),
        };
        let t = Tensor::from_storage(
            Storage::Cuda(storage),
            shape.to_vec(),
            BackpropOp::none(),
            false,
        );
        let p = ptr(&t)?;
        Ok((t, p))
    }

    /// `x (B, K) . w (N, K)^T` for B up to [`GEMV_ROWS`], a warp per output column; `None` when
    /// the shapes or types are not the kernel's (the caller uses cuBLAS).
    pub(crate) fn gemv(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        self.matvec(x, w, false)
    }

    /// The gated unit from a fused gate|up weight `w (2F, K)`: `silu(x . gate^T) * (x . up^T)`,
    /// `(B, F)`, in one kernel; `None` as for [`Kernels::gemv`].
    pub(crate) fn gemv_glu(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        self.matvec(x, w, true)
    }

    /// The addresses of `x (B, K)` and `w (N, K)` when the matrix-vector kernels take them
    /// (types alike and f16 or f32, B up to [`GEMV_ROWS`], rows of whole 16-byte loads), with
    /// B, N, K and the kernels of their type.
    #[allow(clippy::type_complexity)]
    fn matvec_args(
        &self,
        x: &Tensor,
        w: &Tensor,
    ) -> Result<Option<(u64, u64, usize, usize, usize, &Funcs)>> {
        let (Ok((b, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
            return Ok(None);
        };
        let dtype = x.dtype();
        let per16 = 16 / dtype.size_in_bytes();
        if w.dtype() != dtype
            || k != k2
            || b == 0
            || b > GEMV_ROWS
            || !k.is_multiple_of(per16)
            || !x.is_contiguous()
            || !w.is_contiguous()
        {
            return Ok(None);
        }
        let Ok(funcs) = self.funcs(dtype) else {
            return Ok(None);
        };
        let (px, pw) = (ptr(x)?, ptr(w)?);
        if !px.is_multiple_of(16) || !pw.is_multiple_of(16) {
            return Ok(None);
        }
        Ok(Some((px, pw, b, n, k, funcs)))
    }

    /// The fused q|k|v projection with rope and the KV write in one kernel (what
    /// [`Kernels::rope_write`] does, on the product as it is made); `None` where the
    /// matrix-vector kernels do not take `x` and `w`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qkv_rope(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        w: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pool: &Tensor,
        rows: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((px, pw, b, n, k, funcs)) = self.matvec_args(x, w)? else {
            return Ok(None);
        };
        let (h, kh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        if n != (h + 2 * kh) * d || rows.elem_count() != 2 * b || pool.dtype() != DType::F16 {
            return Err(ModelError::Forward("qkv_rope: shapes do not match".into()));
        }
        let (pcos, psin, ppool, prows) = (ptr(cos)?, ptr(sin)?, ptr(pool)?, ptr(rows)?);
        let (q, pq) = self.empty(x.dtype(), &[b, h * d])?;
        let ints = [
            k as i32,
            h as i32,
            kh as i32,
            d as i32,
            cfg.rope_interleaved as i32,
        ];
        let pairs = (n / 2) as u32;
        let launch = LaunchConfig {
            grid_dim: (pairs.div_ceil(THREADS / 32), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(&funcs.gemv_qkv_rope[b - 1]);
        l.arg(&px)
            .arg(&pw)
            .arg(&pcos)
            .arg(&psin)
            .arg(&pq)
            .arg(&ppool)
            .arg(&prows);
        for a in &ints {
            l.arg(a);
        }
        // SAFETY: the arguments match gemv_qkv_rope_*'s signature and the shapes were checked;
        // the rows are inside the pool (DevicePlan checks every block id).
        unsafe { l.launch(launch) }.map_err(|e| err("gemv_qkv_rope", e))?;
        Ok(Some(q))
    }

    fn matvec(&self, x: &Tensor, w: &Tensor, glu: bool) -> Result<Option<Tensor>> {
        let Some((px, pw, b, n, k, funcs)) = self.matvec_args(x, w)? else {
            return Ok(None);
        };
        if glu && !n.is_multiple_of(2) {
            return Ok(None);
        }
        let dtype = x.dtype();
        // The gated unit makes one column of every two rows (gate i and up F + i).
        let n = if glu { n / 2 } else { n };
        let (y, py) = self.empty(dtype, &[b, n])?;
        let (n32, k32) = (n as i32, k as i32);
        let warps = THREADS / 32;
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(warps), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = if glu { &funcs.gemv_glu } else { &funcs.gemv };
        let mut l = self.stream.launch_builder(&f[b - 1]);
        l.arg(&px).arg(&pw).arg(&py).arg(&n32).arg(&k32);
        // SAFETY: the arguments match gemv_*'s and gemv_glu_*'s signatures; x is (b, k), w
        // (n, k) or (2n, k) for the gated unit, y (b, n).
        unsafe { l.launch(cfg) }.map_err(|e| err("gemv", e))?;
        Ok(Some(y))
    }

    /// Rotates the q and k heads of the fused projection `qkv (T, (H + 2 KH) D)` by the tokens'
    /// `cos`/`sin (T, D / 2)`, writes k and v into the pool's `rows` (`(2T)`: K rows then V
    /// rows of this layer) and returns q `(T, H D)`.
    pub(crate) fn rope_write(
        &self,
        cfg: &ModelConfig,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pool: &Tensor,
        rows: &Tensor,
    ) -> Result<Tensor> {
        let (h, kh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (t, width) = qkv.dims2()?;
        if width != (h + 2 * kh) * d || rows.elem_count() != 2 * t || pool.dtype() != DType::F16 {
            return Err(ModelError::Forward(
                "rope_write: shapes do not match".into(),
            ));
        }
        let dtype = qkv.dtype();
        let f = &self.funcs(dtype)?.rope_write;
        let (pqkv, pcos, psin, ppool, prows) =
            (ptr(qkv)?, ptr(cos)?, ptr(sin)?, ptr(pool)?, ptr(rows)?);
        let (q, pq) = self.empty(dtype, &[t, h * d])?;
        let args = [
            t as i32,
            h as i32,
            kh as i32,
            d as i32,
            cfg.rope_interleaved as i32,
        ];
        let cfg = LaunchConfig {
            grid_dim: (t as u32, (h + 2 * kh) as u32, 1),
            block_dim: (((d / 2) as u32).div_ceil(32).clamp(1, 8) * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(f);
        l.arg(&pqkv)
            .arg(&pcos)
            .arg(&psin)
            .arg(&pq)
            .arg(&ppool)
            .arg(&prows);
        for a in &args {
            l.arg(a);
        }
        // SAFETY: the arguments match rope_write_*'s signature and the shapes were checked;
        // the rows are inside the pool (DevicePlan checks every block id).
        unsafe { l.launch(cfg) }.map_err(|e| err("rope_write", e))?;
        Ok(q)
    }

    /// Attention of one query per sequence, `q (B, H D)`, over the pool rows `gather (2, B, C)`
    /// (K then V, contexts padded to C) of which the first `lens (B)` are real. Returns
    /// `(B, H D)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        cfg: &ModelConfig,
        q: &Tensor,
        pool: &Tensor,
        gather: &Tensor,
        lens: &Tensor,
        c: usize,
    ) -> Result<Tensor> {
        let (h, kh, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (b, width) = q.dims2()?;
        if width != h * d || gather.elem_count() != 2 * b * c || lens.elem_count() != b {
            return Err(ModelError::Forward("attention: shapes do not match".into()));
        }
        let dtype = q.dtype();
        let funcs = self.funcs(dtype)?;
        let g = h / kh;
        let chunks = c.div_ceil(CHUNK).max(1);
        // More threads, more positions of V in flight; as many as shared memory allows.
        let smem = |threads: usize| {
            let groups = threads / (d / 2);
            4 * (g * d + g * CHUNK + CHUNK + 2 * MAXG * 32 + groups * g * d)
        };
        let threads = if smem(512) <= 48 * 1024 { 512 } else { 256 };
        let smem = smem(threads);
        let (pq, ppool, pgather, plens) = (ptr(q)?, ptr(pool)?, ptr(gather)?, ptr(lens)?);
        let (out, pout) = self.empty(dtype, &[b, h * d])?;
        let part = match chunks {
            1 => None,
            _ => Some(self.empty(DType::F32, &[b * kh * chunks * g * (d + 2)])?),
        };
        let ppart = part.as_ref().map_or(0, |p| p.1);
        let ints = [b as i32, c as i32, h as i32, kh as i32, d as i32];
        let scale = 1.0 / (d as f32).sqrt();
        let launch = LaunchConfig {
            grid_dim: (kh as u32, b as u32, chunks as u32),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut l = self.stream.launch_builder(&funcs.attention_chunk);
        l.arg(&pq)
            .arg(&ppool)
            .arg(&pgather)
            .arg(&plens)
            .arg(&pout)
            .arg(&ppart);
        for a in &ints {
            l.arg(a);
        }
        l.arg(&scale);
        // SAFETY: the arguments match attention_chunk_*'s signature and the shapes were
        // checked; `part` has room for every chunk's partials when there are several.
        unsafe { l.launch(launch) }.map_err(|e| err("attention_chunk", e))?;
        if part.is_some() {
            let ints = [chunks as i32, h as i32, kh as i32, d as i32];
            let launch = LaunchConfig {
                grid_dim: (h as u32, b as u32, 1),
                block_dim: ((d as u32).div_ceil(32) * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream.launch_builder(&funcs.attention_merge);
            l.arg(&ppart).arg(&pout);
            for a in &ints {
                l.arg(a);
            }
            // SAFETY: as above; the merge reads the partials the chunks wrote.
            unsafe { l.launch(launch) }.map_err(|e| err("attention_merge", e))?;
        }
        // The partials are freed in stream order, after the merge has read them.
        drop(part);
        Ok(out)
    }

    /// `gu (T, 2F)`, gate then up: `silu(gate) * up`, `(T, F)`.
    pub(crate) fn silu_mul(&self, gu: &Tensor) -> Result<Tensor> {
        let (t, f2) = gu.dims2()?;
        let f = f2 / 2;
        let dtype = gu.dtype();
        let func = &self.funcs(dtype)?.silu_mul;
        let pgu = ptr(gu)?;
        let (out, pout) = self.empty(dtype, &[t, f])?;
        let (t32, f32_) = (t as i32, f as i32);
        let launch = LaunchConfig {
            grid_dim: (((t * f) as u32).div_ceil(THREADS).clamp(1, 65_535), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(func);
        l.arg(&pgu).arg(&pout).arg(&t32).arg(&f32_);
        // SAFETY: the arguments match silu_mul_*'s signature; gu is (t, 2f), out (t, f).
        unsafe { l.launch(launch) }.map_err(|e| err("silu_mul", e))?;
        Ok(out)
    }

    /// The residual and the next norm in one pass: `(x + y, rms_norm(x + y) * w)`.
    pub(crate) fn add_rms_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (t, e) = x.dims2()?;
        if y.dims2()? != (t, e) || w.elem_count() != e || w.dtype() != x.dtype() {
            return Err(ModelError::Forward(
                "add_rms_norm: shapes do not match".into(),
            ));
        }
        let dtype = x.dtype();
        let func = &self.funcs(dtype)?.add_rms_norm;
        let (px, py, pw) = (ptr(x)?, ptr(y)?, ptr(w)?);
        let (sum, psum) = self.empty(dtype, &[t, e])?;
        let (normed, pnormed) = self.empty(dtype, &[t, e])?;
        let e32 = e as i32;
        // A thread per 8 values at most (kernels.cu's NORM_PER_THREAD), up to 1024.
        let threads = (e.div_ceil(8) as u32).div_ceil(32).clamp(1, 32) * 32;
        let launch = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(func);
        l.arg(&px)
            .arg(&py)
            .arg(&pw)
            .arg(&psum)
            .arg(&pnormed)
            .arg(&e32)
            .arg(&eps);
        // SAFETY: the arguments match add_rms_norm_*'s signature; shapes checked above.
        unsafe { l.launch(launch) }.map_err(|e| err("add_rms_norm", e))?;
        Ok((sum, normed))
    }
}
