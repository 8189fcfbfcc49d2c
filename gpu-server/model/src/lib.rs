//! Llama-architecture decoders on candle (GGUF with its quantized types, or safetensors with
//! `config.json`), their byte-level BPE tokenizer and chat template, and paged attention over
//! a physical KV block pool.
//!
//! The weights sit behind `&self` ([`Model::forward`]); everything per request (the tokens to
//! run, their positions, the block table) is passed in, and the KV lives in a [`KvPool`] that
//! the caller owns. Which blocks a sequence may use is decided elsewhere (the logical state in
//! `kvmesh-gpu-server-kv`); this crate only reads and writes the slots it is told to.

mod config;
mod gguf;
mod llama;
mod pool;
mod q4_1;
mod safetensors;
mod template;
pub mod tiny;
mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use llama::{Model, SeqInput, max_abs_diff};
pub use pool::KvPool;
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::{PreTokenizer, Tokenizer};

use std::path::Path;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("forward: {0}")]
    Forward(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A loaded model with its tokenizer and chat template.
#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// How weights are prepared at load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Run Q4_1 weights with kvmesh's AVX2 kernel where the CPU has AVX2 and FMA (candle's
    /// Q4_1 matmul is scalar code on x86-64). On by default; off leaves every weight to candle.
    pub fast_q4_1: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { fast_q4_1: true }
    }
}

/// Loads a `.gguf` file, or a directory with `config.json`, `tokenizer.json` and
/// `*.safetensors` (plus `tokenizer_config.json` for the chat template).
pub fn load(path: &Path) -> Result<Loaded> {
    load_with(path, LoadOptions::default())
}

/// [`load`] with explicit [`LoadOptions`].
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Loaded> {
    if path.is_dir() {
        safetensors::load(path)
    } else {
        gguf::load(path, opts)
    }
}
