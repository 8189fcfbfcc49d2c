//! kvmesh's OpenAI-compatible model server: the HTTP edge (axum) over the engine, with
//! `/metrics`, a JSON debug view of the cache, and the text-chunk residency mapping.

pub mod api;
mod error;
mod generate;
mod metrics;
pub mod reporter;
pub mod residency;
mod routes;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::http::HeaderValue;
use axum::routing::{get, post};
use kvmesh_gpu_server_engine::{Engine, EngineConfig, EngineHandle, FetchPolicy, TierConfig};
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
    pub kv: KvTiers,
}

/// KV tier sizes as the operator (or the controller's `KVMESH_KV_*` variables) gives them, in
/// bytes: `None` takes the server default, `Some(0)` turns a tier off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvTiers {
    /// Device tier; when set it overrides `EngineConfig::num_blocks`. Cannot be 0.
    pub device_bytes: Option<u64>,
    pub host_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
    /// The disk tier is off without a directory.
    pub disk_dir: Option<PathBuf>,
    pub fetch: FetchPolicy,
}

/// HOST tier size when none is given.
pub const DEFAULT_HOST_BYTES: u64 = 512 << 20;
/// DISK tier size when a directory but no size is given.
pub const DEFAULT_DISK_BYTES: u64 = 2 << 30;

impl KvTiers {
    /// Block counts for blocks of `block_bytes`: `(device, tier config)`.
    pub fn resolve(
        &self,
        block_bytes: usize,
        device_blocks: usize,
        model_tag: u64,
    ) -> anyhow::Result<(usize, TierConfig)> {
        let blocks = |b: u64| (b / block_bytes.max(1) as u64) as usize;
        let device = match self.device_bytes {
            None => device_blocks,
            Some(0) => anyhow::bail!("the device KV tier cannot be off (device bytes = 0)"),
            Some(b) if blocks(b) == 0 => {
                anyhow::bail!("device KV tier of {b} bytes holds no {block_bytes}-byte block")
            }
            Some(b) => blocks(b),
        };
        let host_blocks = blocks(self.host_bytes.unwrap_or(DEFAULT_HOST_BYTES));
        let disk_blocks = match (&self.disk_dir, self.disk_bytes) {
            (Some(_), None) => blocks(DEFAULT_DISK_BYTES),
            (_, Some(b)) => blocks(b),
            (None, None) => 0,
        };
        Ok((
            device,
            TierConfig {
                host_blocks,
                disk_blocks,
                disk_dir: self.disk_dir.clone(),
                model_tag,
                fetch: self.fetch,
            },
        ))
    }
}

/// A hash of the model's weight files (disk KV blocks are only served to the same weights).
fn model_tag(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".safetensors") || name == "config.json" {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut r = std::fs::File::open(&f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.digest())
}

impl AppState {
    /// Loads the model at `path` and starts the engine.
    pub fn load(path: &Path, cfg: &ServerConfig) -> anyhow::Result<Arc<Self>> {
        Self::load_with(path, cfg, kvmesh_gpu_server_model::LoadOptions::default())
    }

    /// [`AppState::load`] with the device and weight type of `opts` (the KV pool goes on the
    /// model's device).
    pub fn load_with(
        path: &Path,
        cfg: &ServerConfig,
        opts: kvmesh_gpu_server_model::LoadOptions,
    ) -> anyhow::Result<Arc<Self>> {
        let loaded = kvmesh_gpu_server_model::load_with(path, opts)?;
        let kv_bytes_per_token_f16 = loaded.model.config().kv_bytes_per_token_f16();
        let stop = loaded.tokenizer.stop_ids.clone();
        let block_bytes = kv_bytes_per_token_f16 * cfg.engine.block_tokens;
        let (num_blocks, tiers) =
            cfg.kv
                .resolve(block_bytes, cfg.engine.num_blocks, model_tag(path)?)?;
        let engine_cfg = EngineConfig {
            num_blocks,
            ..cfg.engine
        };
        tracing::info!(
            device_blocks = num_blocks,
            host_blocks = tiers.host_blocks,
            disk_blocks = tiers.disk_blocks,
            block_bytes,
            "KV tiers"
        );
        let engine = Engine::start_tiered(Arc::new(loaded.model), stop, engine_cfg, &tiers);
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

/// Response header naming the replica that answered: the id it reports to the control
/// plane. On every response, so a client, a bench or an operator can tell where a request
/// was served behind any router (Envoy and the SGLang router both pass it on).
pub const REPLICA_HEADER: &str = "x-kvmesh-replica";

/// The HTTP routes; every response carries [`REPLICA_HEADER`] with `replica`.
pub fn router(state: Arc<AppState>, replica: HeaderValue) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/debug/cache", get(routes::debug_cache))
        .fallback(routes::fallback)
        .with_state(state)
        .layer(axum::middleware::map_response(
            move |mut res: axum::response::Response| {
                let replica = replica.clone();
                async move {
                    res.headers_mut().insert(REPLICA_HEADER, replica);
                    res
                }
            },
        ))
}

/// Serves on an already bound listener until the process ends, as replica `replica_id`
/// (`None`: the listener's address, as the reporter defaults it).
pub async fn serve_as(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    replica_id: Option<&str>,
) -> std::io::Result<()> {
    let id = match replica_id {
        Some(id) => id.to_owned(),
        None => listener.local_addr()?.to_string(),
    };
    let replica = HeaderValue::from_str(&id).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("replica id {id:?} is not a valid header value"),
        )
    })?;
    axum::serve(listener, router(state, replica)).await
}

/// [`serve_as`] with the listener's address as the replica id.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    serve_as(listener, state, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_bytes_become_blocks_and_device_bytes_win_over_blocks() {
        let bb = 1000;
        let (dev, t) = KvTiers::default().resolve(bb, 64, 9).unwrap();
        assert_eq!(dev, 64, "no device bytes: --kv-blocks");
        assert_eq!(t.host_blocks, (DEFAULT_HOST_BYTES / 1000) as usize);
        assert_eq!(t.disk_blocks, 0, "no directory: no disk tier");
        assert_eq!(t.model_tag, 9);
        let kv = KvTiers {
            device_bytes: Some(10_500),
            host_bytes: Some(0),
            disk_bytes: Some(3_000),
            disk_dir: Some("/x".into()),
            fetch: FetchPolicy::Always,
        };
        let (dev, t) = kv.resolve(bb, 64, 0).unwrap();
        assert_eq!((dev, t.host_blocks, t.disk_blocks), (10, 0, 3));
        assert_eq!(t.fetch, FetchPolicy::Always);
        let dir_only = KvTiers {
            disk_dir: Some("/x".into()),
            ..KvTiers::default()
        };
        assert_eq!(
            dir_only.resolve(bb, 64, 0).unwrap().1.disk_blocks,
            (DEFAULT_DISK_BYTES / 1000) as usize
        );
        for bad in [0, 999] {
            let kv = KvTiers {
                device_bytes: Some(bad),
                ..KvTiers::default()
            };
            assert!(kv.resolve(bb, 64, 0).is_err(), "{bad} device bytes");
        }
    }
}
