//! The physical KV block pool of the compute device (host memory on the CPU backend).
//!
//! Layout, block-major: `[block][layer][K|V][slot][kv_head * head_dim]` in f16, as llama.cpp
//! keeps its cache by default (half the bytes of f32; reads widen to f32). A block is one
//! contiguous run of bytes, so moving it to another tier is a single copy
//! ([`KvPool::block_bytes`]). A block id from the logical allocator indexes it directly; the
//! pool never decides which block is used.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::config::ModelConfig;

/// K and V storage for `num_blocks` blocks of `block_tokens` tokens, every layer.
#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    kv_dim: usize,
    layers: usize,
    num_blocks: usize,
    data: Vec<f16>,
}

impl KvPool {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_tokens: usize) -> Self {
        let block = 2 * cfg.layers * block_tokens * cfg.kv_dim();
        Self {
            block_tokens,
            kv_dim: cfg.kv_dim(),
            layers: cfg.layers,
            num_blocks,
            data: vec![f16::ZERO; num_blocks * block],
        }
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

    /// The bytes of block `id` (for copies to another tier); `None` outside the pool.
    pub fn block_bytes(&self, id: u32) -> Option<&[u8]> {
        let n = self.block_elems();
        let at = id as usize * n;
        self.data
            .get(at..at + n)
            .map(bytemuck::cast_slice::<f16, u8>)
    }

    /// The bytes of block `id`, writable (for copies from another tier).
    pub fn block_bytes_mut(&mut self, id: u32) -> Option<&mut [u8]> {
        let n = self.block_elems();
        let at = id as usize * n;
        self.data
            .get_mut(at..at + n)
            .map(bytemuck::cast_slice_mut::<f16, u8>)
    }

    /// Copies block `from` over block `to` (every layer, K and V); false outside the pool.
    pub fn copy_block(&mut self, from: u32, to: u32) -> bool {
        let n = self.block_elems();
        let (f, t) = (from as usize, to as usize);
        if f >= self.num_blocks || t >= self.num_blocks {
            return false;
        }
        self.data.copy_within(f * n..(f + 1) * n, t * n);
        true
    }

    /// Element offset of `pos` of `layer`'s K (`kv` 0) or V (`kv` 1).
    fn offset(&self, blocks: &[u32], layer: usize, kv: usize, pos: usize) -> Option<usize> {
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

    /// Writes the K and V rows of the tokens at `start..start + n` (rows of `kv_dim` floats).
    /// Returns false if a position has no block in `blocks`.
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
            self.data[ok..ok + d].convert_from_f32_slice(kr);
            self.data[ov..ov + d].convert_from_f32_slice(vr);
        }
        true
    }

    /// Copies K and V of positions `0..n` into contiguous `[n][kv_dim]` buffers.
    pub fn gather(
        &self,
        layer: usize,
        blocks: &[u32],
        n: usize,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> bool {
        let d = self.kv_dim;
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
            self.data[ok..ok + run * d].convert_to_f32_slice(&mut k[at..at + run * d]);
            self.data[ov..ov + run * d].convert_to_f32_slice(&mut v[at..at + run * d]);
            pos += run;
        }
        true
    }
}
