//! The checked shape of a decoder, read once from GGUF metadata or `config.json`.

use serde::Serialize;

use crate::{ModelError, Result};

/// Which flavour of the Llama architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// Llama, SmolLM2, Mistral-style: no biases.
    Llama,
    /// Qwen2: biases on the q, k and v projections.
    Qwen2,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    /// Longest sequence (prompt plus completion) the model accepts.
    pub context_length: usize,
    /// GGUF Llama checkpoints permute q/k so that rotary pairs are adjacent (`rope_i`);
    /// HF checkpoints and Qwen2 rotate the two halves (`rope`).
    pub rope_interleaved: bool,
}

impl ModelConfig {
    /// Checks the shape is one this implementation can run.
    pub fn validate(self) -> Result<Self> {
        let bad = |m: &str| Err(ModelError::Metadata(m.to_string()));
        if self.layers == 0 || self.hidden == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("zero-sized model dimension");
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad("heads must be a multiple of kv heads");
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad("head dim must be even");
        }
        if self.context_length == 0 {
            return bad("context length is zero");
        }
        Ok(self)
    }

    /// Width of one token's K (or V) row across kv heads.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of K and V per token over all layers at 16-bit precision: what llama.cpp keeps by
    /// default, and the yardstick for the pool's own bytes per token.
    pub fn kv_bytes_per_token_f16(&self) -> usize {
        2 * self.layers * self.kv_dim() * 2
    }
}
