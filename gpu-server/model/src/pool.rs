//! The physical KV block pool of the compute device: host memory on the CPU backend, GPU
//! memory on CUDA (a build with the `cuda` feature).
//!
//! Layout, block-major: `[block][layer][K|V][slot][kv_head * head_dim]` in f16, as llama.cpp
//! keeps its cache by default (half the bytes of f32; reads widen to f32). A block is one
//! contiguous run of bytes, so moving it to another tier is a single copy
//! ([`KvPool::block_bytes`] on the host, [`KvPool::device_block`] on a GPU). A block id from the
//! logical allocator indexes it directly; the pool never decides which block is used.
//!
//! On a GPU the pool is one f16 tensor of rows `(rows, kv_dim)`, a row per (block, layer, K|V,
//! slot) in the same order; the forward pass writes rows with one scatter and reads them with one
//! gather per layer ([`KvPool::row`] numbers them).

use candle_core::{DType, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::aligned::Aligned;
use crate::config::ModelConfig;
use crate::llama::Model;

#[derive(Debug)]
enum Store {
    Host(Aligned<f16>),
    /// `(num_blocks * layers * 2 * block_tokens, kv_dim)` f16 on a GPU.
    Device(Tensor),
}

/// K and V storage for `num_blocks` blocks of `block_tokens` tokens, every layer.
#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    kv_dim: usize,
    layers: usize,
    num_blocks: usize,
    store: Store,
}

/// One block of a pool in GPU memory: its address and length, and the stream the forward pass
/// runs on (copies on another stream wait for it, and it for them).
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct DeviceBlock {
    pub ptr: cudarc::driver::sys::CUdeviceptr,
    pub bytes: usize,
    pub stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

impl KvPool {
    /// A pool in host memory (the CPU backend).
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_tokens: usize) -> Self {
        let block = 2 * cfg.layers * block_tokens * cfg.kv_dim();
        Self {
            block_tokens,
            kv_dim: cfg.kv_dim(),
            layers: cfg.layers,
            num_blocks,
            store: Store::Host(Aligned::new(num_blocks * block)),
        }
    }

    /// A pool on `model`'s device: host memory for the CPU, GPU memory for CUDA.
    pub fn for_model(model: &Model, num_blocks: usize, block_tokens: usize) -> crate::Result<Self> {
        let cfg = model.config();
        let dev = model.device();
        if dev.is_cpu() {
            return Ok(Self::new(cfg, num_blocks, block_tokens));
        }
        Self::new_rows(cfg, num_blocks, block_tokens, dev)
    }

    /// A pool kept as the GPU keeps it, rows of one f16 tensor on `device`, written and read by
    /// tensor ops ([`KvPool::for_model`] makes one for a GPU; on the CPU it lets tests run
    /// the GPU's forward path against the host pool's).
    pub fn new_rows(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_tokens: usize,
        device: &candle_core::Device,
    ) -> crate::Result<Self> {
        let rows = num_blocks * cfg.layers * 2 * block_tokens;
        Ok(Self {
            block_tokens,
            kv_dim: cfg.kv_dim(),
            layers: cfg.layers,
            num_blocks,
            store: Store::Device(Tensor::zeros((rows, cfg.kv_dim()), DType::F16, device)?),
        })
    }

    /// Whether the pool is rows of a tensor (GPU memory, or [`KvPool::new_rows`]) rather than
    /// host memory the CPU path reads directly.
    pub fn on_device(&self) -> bool {
        matches!(self.store, Store::Device(_))
    }

    /// The GPU pool's rows, `(rows, kv_dim)` f16.
    pub(crate) fn device_rows(&self) -> Option<&Tensor> {
        match &self.store {
            Store::Device(t) => Some(t),
            Store::Host(_) => None,
        }
    }

    /// Row of `pos` (within its block, `slot`) of `block` for `layer`'s K (`kv` 0) or V (1).
    pub(crate) fn row(&self, block: usize, layer: usize, kv: usize, slot: usize) -> usize {
        ((block * self.layers + layer) * 2 + kv) * self.block_tokens + slot
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub(crate) fn layers(&self) -> usize {
        self.layers
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes of K and V one token takes in this pool (all layers).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_dim * std::mem::size_of::<f16>()
    }

    /// Bytes of one block (all layers, K and V).
    pub fn block_bytes_len(&self) -> usize {
        self.bytes_per_token() * self.block_tokens
    }

    pub fn total_bytes(&self) -> usize {
        self.block_bytes_len() * self.num_blocks
    }

    fn block_elems(&self) -> usize {
        2 * self.layers * self.block_tokens * self.kv_dim
    }

    /// The bytes of block `id` (for copies to another tier); `None` outside the pool or when
    /// the pool is in GPU memory ([`KvPool::device_block`]).
    pub fn block_bytes(&self, id: u32) -> Option<&[u8]> {
        let n = self.block_elems();
        let at = id as usize * n;
        match &self.store {
            Store::Host(data) => data.get(at..at + n).map(bytemuck::cast_slice::<f16, u8>),
            Store::Device(_) => None,
        }
    }

    /// The bytes of block `id`, writable (for copies from another tier).
    pub fn block_bytes_mut(&mut self, id: u32) -> Option<&mut [u8]> {
        let n = self.block_elems();
        let at = id as usize * n;
        match &mut self.store {
            Store::Host(data) => data
                .get_mut(at..at + n)
                .map(bytemuck::cast_slice_mut::<f16, u8>),
            Store::Device(_) => None,
        }
    }

    /// Block `id` of a pool in GPU memory; `None` outside the pool or for a host pool.
    #[cfg(feature = "cuda")]
    pub fn device_block(&self, id: u32) -> Option<DeviceBlock> {
        use cudarc::driver::DevicePtr;
        let Store::Device(t) = &self.store else {
            return None;
        };
        if id as usize >= self.num_blocks {
            return None;
        }
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            return None;
        };
        let slice = cs.as_cuda_slice::<f16>().ok()?;
        let stream = cs.device.cuda_stream();
        // The address is fixed for the tensor's life; the guard only orders this read.
        let base = slice.device_ptr(&stream).0;
        let bytes = self.block_bytes_len();
        let elem = std::mem::size_of::<f16>() as u64;
        Some(DeviceBlock {
            ptr: base + (layout.start_offset() as u64) * elem + id as u64 * bytes as u64,
            bytes,
            stream,
        })
    }

    /// Copies block `from` over block `to` (every layer, K and V); false outside the pool.
    pub fn copy_block(&mut self, from: u32, to: u32) -> bool {
        let n = self.block_elems();
        let (f, t) = (from as usize, to as usize);
        if f >= self.num_blocks || t >= self.num_blocks {
            return false;
        }
        match &mut self.store {
            Store::Host(data) => {
                data.copy_within(f * n..(f + 1) * n, t * n);
                true
            }
            Store::Device(rows) => {
                // Rows of a block are contiguous: one narrow, one in-place set.
                let per = n / self.kv_dim;
                let src = rows.narrow(0, f * per, per).and_then(|s| s.copy());
                src.and_then(|s| rows.slice_set(&s, 0, t * per)).is_ok()
            }
        }
    }

    /// The f16 elements of a host pool; `None` for a pool in GPU memory.
    pub(crate) fn host_data(&self) -> Option<&[f16]> {
        match &self.store {
            Store::Host(data) => Some(data),
            Store::Device(_) => None,
        }
    }

    /// Element offset of `pos` of `layer`'s K (`kv` 0) or V (`kv` 1); the rest of `pos`'s
    /// block follows it (`kv_dim` elements a position).
    pub(crate) fn offset(
        &self,
        blocks: &[u32],
        layer: usize,
        kv: usize,
        pos: usize,
    ) -> Option<usize> {
        let block = *blocks.get(pos / self.block_tokens)? as usize;
        if block >= self.num_blocks {
            return None;
        }
        let run = self.block_tokens * self.kv_dim;
        Some(
            block * self.block_elems()
                + (layer * 2 + kv) * run
                + (pos % self.block_tokens) * self.kv_dim,
        )
    }

    /// Writes the K and V rows of the tokens at `start..start + n` (rows of `kv_dim` floats)
    /// of a host pool. Returns false if a position has no block in `blocks`, or for a GPU pool.
    pub fn write(
        &mut self,
        layer: usize,
        blocks: &[u32],
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> bool {
        let d = self.kv_dim;
        for (i, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            let (Some(ok), Some(ov)) = (
                self.offset(blocks, layer, 0, start + i),
                self.offset(blocks, layer, 1, start + i),
            ) else {
                return false;
            };
            let Store::Host(data) = &mut self.store else {
                return false;
            };
            data[ok..ok + d].convert_from_f32_slice(kr);
            data[ov..ov + d].convert_from_f32_slice(vr);
        }
        true
    }

    /// Copies K and V of positions `0..n` of a host pool into contiguous `[n][kv_dim]` buffers.
    pub fn gather(
        &self,
        layer: usize,
        blocks: &[u32],
        n: usize,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> bool {
        let d = self.kv_dim;
        let Store::Host(data) = &self.store else {
            return false;
        };
        k.resize(n * d, 0.0);
        v.resize(n * d, 0.0);
        let mut pos = 0;
        while pos < n {
            let run = (self.block_tokens - pos % self.block_tokens).min(n - pos);
            let (Some(ok), Some(ov)) = (
                self.offset(blocks, layer, 0, pos),
                self.offset(blocks, layer, 1, pos),
            ) else {
                return false;
            };
            let at = pos * d;
            data[ok..ok + run * d].convert_to_f32_slice(&mut k[at..at + run * d]);
            data[ov..ov + run * d].convert_to_f32_slice(&mut v[at..at + run * d]);
            pos += run;
        }
        true
    }
}
