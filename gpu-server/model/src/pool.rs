//! The physical KV block pool of the compute device (host memory on the CPU backend).
//!
//! Layout per layer, for K and for V: `[block][slot][kv_head * head_dim]` in f16, as llama.cpp
//! keeps its cache by default (half the bytes of f32; reads widen to f32). A block id from the
//! logical allocator indexes it directly; the pool never decides which block is used.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::config::ModelConfig;

/// K and V storage for `num_blocks` blocks of `block_tokens` tokens, every layer.
#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    kv_dim: usize,
    num_blocks: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvPool {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_tokens: usize) -> Self {
        let per_layer = num_blocks * block_tokens * cfg.kv_dim();
        Self {
            block_tokens,
            kv_dim: cfg.kv_dim(),
            num_blocks,
            k: (0..cfg.layers)
                .map(|_| vec![f16::ZERO; per_layer])
                .collect(),
            v: (0..cfg.layers)
                .map(|_| vec![f16::ZERO; per_layer])
                .collect(),
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
        2 * self.k.len() * self.kv_dim * std::mem::size_of::<f16>()
    }

    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token() * self.num_blocks * self.block_tokens
    }

    fn offset(&self, blocks: &[u32], pos: usize) -> Option<usize> {
        let block = *blocks.get(pos / self.block_tokens)? as usize;
        if block >= self.num_blocks {
            return None;
        }
        Some((block * self.block_tokens + pos % self.block_tokens) * self.kv_dim)
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
            let Some(o) = self.offset(blocks, start + i) else {
                return false;
            };
            self.k[layer][o..o + d].convert_from_f32_slice(kr);
            self.v[layer][o..o + d].convert_from_f32_slice(vr);
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
            let Some(o) = self.offset(blocks, pos) else {
                return false;
            };
            let at = pos * d;
            self.k[layer][o..o + run * d].convert_to_f32_slice(&mut k[at..at + run * d]);
            self.v[layer][o..o + run * d].convert_to_f32_slice(&mut v[at..at + run * d]);
            pos += run;
        }
        true
    }
}
