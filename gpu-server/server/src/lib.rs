//! kvmesh's OpenAI-compatible model server: the HTTP edge (axum) over the engine, with
//! `/metrics`, a JSON debug view of the cache, and the text-chunk residency mapping.

pub mod api;
mod error;
mod generate;
mod metrics;
pub mod reporter;
pub mod residency;
mod routes;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use kvmesh_gpu_server_engine::{Engine, EngineConfig, EngineHandle};
use kvmesh_gpu_server_model::{ChatTemplate, Tokenizer};

pub use error::ApiError;
pub use metrics::Metrics;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// The name clients must send as `model`; also seeds the chunk hashes.
    pub model_name: String,
    pub chunk_bytes: u32,
    pub metrics: Metrics,
    /// Completion length when the request sets none.
    pub max_tokens_default: usize,
    pub kv_bytes_per_token_f16: usize,
    pub created: u64,
}

/// Server settings beyond the engine's.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_name: String,
    pub chunk_bytes: u32,
    pub max_tokens_default: usize,
    pub engine: EngineConfig,
}

impl AppState {
    /// Loads the model at `path` and starts the engine.
    pub fn load(path: &Path, cfg: &ServerConfig) -> anyhow::Result<Arc<Self>> {
        let loaded = kvmesh_gpu_server_model::load(path)?;
        let kv_bytes_per_token_f16 = loaded.model.config().kv_bytes_per_token_f16();
        let stop = loaded.tokenizer.stop_ids.clone();
        let engine = Engine::start(Arc::new(loaded.model), stop, cfg.engine);
        Ok(Arc::new(Self {
            metrics: Metrics::new(engine.clone()),
            engine,
            tokenizer: Arc::new(loaded.tokenizer),
            template: loaded.template,
            model_name: cfg.model_name.clone(),
            chunk_bytes: cfg.chunk_bytes,
            max_tokens_default: cfg.max_tokens_default,
            kv_bytes_per_token_f16,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }))
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/debug/cache", get(routes::debug_cache))
        .fallback(routes::fallback)
        .with_state(state)
}

/// Serves on an already bound listener until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
