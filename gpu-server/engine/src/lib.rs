//! The model server's scheduler: one thread that owns the KV state and the physical pool,
//! admits requests from a bounded queue, and runs steps that mix decode tokens of running
//! sequences with prefill chunks of new ones under a token budget (continuous batching,
//! chunked prefill). Requests that the client abandoned are dropped and their blocks freed.
//!
//! KV tiers: evicted blocks are demoted from the device pool to HOST memory and DISK slabs
//! and promoted back on a prefix hit when the measured cost model says fetching beats
//! recomputing ([`TierConfig`], [`Engine::start_tiered`]).
//!
//! It does not speak HTTP: callers [`EngineHandle::submit`] token ids and read [`Event`]s.

mod cost;
#[cfg(feature = "cuda")]
mod cuda;
mod disk;
mod report;
mod sampling;
mod scheduler;
mod tiers;
mod xxh3;

pub use cost::{FetchPolicy, TierCostReport};
#[cfg(feature = "cuda")]
pub use cuda::CudaCopier;
pub use disk::{DiskReadProbe, ScanReport, evict_page_cache};
pub use report::{CostStatus, LoadReport, StateUpdate, Status, TierLoad, TierStatus};
pub use sampling::{SamplingParams, sample};
pub use scheduler::{Engine, EngineConfig, EngineHandle, TierBlocks};
pub use tiers::{BlockCopier, CpuCopier, DiskStatus, HostMemory, TierBytes, TierConfig};

use tokio::sync::mpsc;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FinishReason {
    /// A stop token was generated (or the caller matched a stop string and stopped reading).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// What the engine tells a request's caller, in order: `Started`, `Token`s, then `Finished`
/// or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Admitted; `cached_tokens` prompt tokens came from the prefix cache.
    Started {
        cached_tokens: usize,
    },
    Token(u32),
    Finished(FinishReason),
    Failed(String),
}

/// A text chunk of the request's canonical prompt and the index of the prompt token that holds
/// its last byte (see `kvmesh-gpu-server-server`'s residency module for the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEnd {
    pub hash: u64,
    pub token: usize,
}

/// One generation request.
#[derive(Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub chunks: Vec<ChunkEnd>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Return the logits of every prompt token and each sampled one (tests only).
    pub logits: Option<mpsc::UnboundedSender<Vec<f32>>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    #[error(
        "prompt of {prompt} tokens plus at least one generated token exceeds the context of {context}"
    )]
    TooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt needs {need} KV blocks but the pool has {have}")]
    TooLarge { need: usize, have: usize },
}
