//! Llama-architecture decoders on candle (GGUF with its quantized types, or safetensors with
//! `config.json`), their byte-level BPE tokenizer and chat template, and paged attention over
//! a physical KV block pool.
//!
//! The weights sit behind `&self` ([`Model::forward`]); everything per request (the tokens to
//! run, their positions, the block table) is passed in, and the KV lives in a [`KvPool`] that
//! the caller owns. Which blocks a sequence may use is decided elsewhere (the logical state in
//! `kvmesh-gpu-server-kv`); this crate only reads and writes the slots it is told to.

pub mod aligned;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod gguf;
mod llama;
mod paged;
mod pool;
mod q4_1;
mod safetensors;
mod template;
pub mod tiny;
mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use llama::{Model, SeqInput, max_abs_diff};
#[cfg(feature = "cuda")]
pub use pool::DeviceBlock;
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
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Run Q4_1 weights with kvmesh's AVX2 kernel where the CPU has AVX2, FMA and F16C (candle's
    /// Q4_1 matmul is scalar code on x86-64). On by default; off leaves every weight to candle.
    /// CPU only.
    pub fast_q4_1: bool,
    /// Where the weights (and the KV pool made for them, [`KvPool::for_model`]) live:
    /// `Device::Cpu`, or a CUDA device in a build with the `cuda` feature ([`device`]).
    pub device: candle_core::Device,
    /// Type of the projection weights: `None` keeps the file's (quantized types stay quantized);
    /// `Some(F16)` or `Some(F32)` dequantizes every projection at load (for GPU throughput at
    /// f16, or for comparing devices on identical float weights).
    pub weights: Option<candle_core::DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            fast_q4_1: true,
            device: candle_core::Device::Cpu,
            weights: None,
        }
    }
}

/// The compute device named `cpu`, `cuda` or `cuda:N` (CUDA in a build with the `cuda` feature).
pub fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = match n.strip_prefix("cuda:") {
                Some(i) => i
                    .parse()
                    .map_err(|_| ModelError::Metadata(format!("bad device {n:?}")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Metadata(format!(
                    "device {n:?}: this build has no CUDA (build with --features cuda)"
                )));
            }
            let dev = candle_core::Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let candle_core::Device::Cuda(cuda) = &dev {
                // Per-use events on every tensor cost a record and a wait on each kernel
                // launch. All of a model's tensors live on this device's one stream, and the
                // KV tier copies (their own stream) are ordered by explicit events instead.
                #[allow(unsafe_code)]
                // SAFETY: as above: no candle tensor is used from a second stream.
                unsafe {
                    cuda.disable_event_tracking()
                };
            }
            Ok(dev)
        }
        other => Err(ModelError::Metadata(format!(
            "unknown device {other:?} (cpu, cuda or cuda:N)"
        ))),
    }
}

/// Whether a CUDA device can be opened (a `cuda` build on a machine with a GPU and its driver).
pub fn cuda_device_present() -> bool {
    candle_core::utils::cuda_is_available() && candle_core::Device::new_cuda(0).is_ok()
}

/// Loads a `.gguf` file, or a directory with `config.json`, `tokenizer.json` and
/// `*.safetensors` (plus `tokenizer_config.json` for the chat template).
pub fn load(path: &Path) -> Result<Loaded> {
    load_with(path, LoadOptions::default())
}

/// [`load`] with explicit [`LoadOptions`].
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Loaded> {
    if path.is_dir() {
        safetensors::load(path, &opts)
    } else {
        gguf::load(path, &opts)
    }
}
