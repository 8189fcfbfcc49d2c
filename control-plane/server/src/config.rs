//! The declarative configuration file (YAML), parsed once into a checked,
//! read-only [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// How the control plane listens and times its work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC: ADS for Envoy and the state pump, and ReplicaState for replicas.
    #[serde(default = "default_grpc")]
    pub grpc: SocketAddr,
    /// HTTP admin API; loopback by default.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Bearer token required for changes (reads are open). If unset, the
    /// `KVMESH_ADMIN_TOKEN` environment variable; if neither, changes are refused.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A replica silent for this long leaves EDS.
    #[serde(default = "default_silence_ms")]
    pub replica_silence_ms: u64,
    /// After start, replicas get this long to re-register before the first
    /// EDS and state snapshots are served (so a restart never serves less).
    /// Must exceed the replicas' reconnect backoff cap (1 s in the reporter).
    #[serde(default = "default_warmup_ms")]
    pub warmup_ms: u64,
    /// Live state is published at most this often.
    #[serde(default = "default_publish_ms")]
    pub publish_interval_ms: u64,
    /// Residency resources per replica (`chunk % shards`).
    #[serde(default = "default_shards")]
    pub residency_shards: u32,
    /// Where verified wasm modules are kept, by sha256 (Envoy loads them from here).
    #[serde(default = "default_store")]
    pub module_store: PathBuf,
    /// How long a strategy change waits for Envoy's ACK/NACK.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Pools of this file (static). May be empty when `kubernetes` is set.
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// Pools from the cluster's `InferenceEndpointConfig` and `CatalogModel` resources, their
    /// members from the EndpointSlices of the Services the controller made for them.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSource>,
}

/// Where and how pools from Kubernetes are served: every such pool shares one Envoy listener
/// and is reached under the path prefix `/<namespace>/<name>` (so an OpenAI client's base URL
/// is `http://<gateway>/<namespace>/<name>/v1`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSource {
    /// The gateway listener shared by the pools from Kubernetes.
    pub listener: SocketAddr,
    /// Watch one namespace only (all by default).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Strategy name (as the resources name them: `prefix-aware`, `kv-aware`, `round-robin`)
    /// to its wasm module (path relative to the config file, or `http://` URL). A resource
    /// whose strategy has no module here is served without a routing filter (Envoy's
    /// least-request balancing), with a warning.
    #[serde(default)]
    pub strategies: std::collections::BTreeMap<String, String>,
    /// Request body limit of these pools (Envoy answers 413 above it).
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: u32,
    /// Idle timeout of these pools' requests: how long one may go with no byte from its
    /// replica (a stream that keeps sending is never cut).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Changes seen within this long are applied together.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
}

/// One model pool: an Envoy listener, route and cluster, with its routing strategy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub name: String,
    pub model: String,
    /// Where Envoy listens for this pool's clients.
    pub listener: SocketAddr,
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Request body limit (Envoy answers 413 above it).
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: u32,
    /// Idle timeout of a request: how long it may go with no byte from its replica (a
    /// stream that keeps sending is never cut; Envoy answers 504 when one is idle).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Routing filter; without one Envoy balances round-robin over EDS members.
    #[serde(default)]
    pub strategy: Option<StrategySpec>,
    /// Diagnostic: path of the state-probe wasm filter, installed ahead of
    /// the routing filter to answer `GET /kvmesh/state/<pool>` (tests, benchmarks).
    #[serde(default)]
    pub probe_module: Option<String>,
    /// Set for pools from Kubernetes only (never in the file): the path prefix that selects
    /// this pool on the shared gateway listener, and the ready endpoints Kubernetes lists for
    /// it (served even before, or without, their replica registering over `kvmesh.v1`).
    #[serde(skip)]
    pub gateway: Option<GatewayRoute>,
}

/// How a pool from Kubernetes is reached and who serves it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GatewayRoute {
    /// `/<namespace>/<name>`.
    pub path_prefix: String,
    /// Ready endpoints from the EndpointSlices.
    pub discovered: Vec<SocketAddr>,
}

/// A routing strategy: a wasm module (path or http URL), optionally pinned
/// by sha256, and its parameters.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    /// "round-robin" | "prefix-aware" | "kv-aware" | a third party's name.
    pub name: String,
    /// Path (relative to the config file) or `http://` URL of the module.
    pub module: String,
    #[serde(default)]
    pub sha256: Option<String>,
    /// Strategy parameters (JSON object), passed to the filter as `strategy_config`.
    #[serde(default)]
    pub params: serde_json::Value,
}

fn default_grpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18000))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18001))
}
fn default_silence_ms() -> u64 {
    3000
}
fn default_warmup_ms() -> u64 {
    2000
}
fn default_publish_ms() -> u64 {
    20
}
fn default_shards() -> u32 {
    16
}
fn default_store() -> PathBuf {
    std::env::temp_dir().join("kvmesh-modules")
}
fn default_ack_timeout_ms() -> u64 {
    10_000
}
fn default_debounce_ms() -> u64 {
    200
}
fn default_chunk_bytes() -> u32 {
    256
}
fn default_body_limit() -> u32 {
    4 << 20
}
fn default_timeout_ms() -> u64 {
    120_000
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config =
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |module: &mut String| {
            if !module.starts_with("http://") && Path::new(module.as_str()).is_relative() {
                *module = base.join(module.as_str()).to_string_lossy().into_owned();
            }
        };
        for pool in &mut config.pools {
            if let Some(s) = &mut pool.strategy {
                resolve(&mut s.module);
            }
        }
        if let Some(k) = &mut config.kubernetes {
            k.strategies.values_mut().for_each(resolve);
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.pools.is_empty() && self.kubernetes.is_none() {
            return bad("no pools, and no kubernetes source".into());
        }
        check_pools(&self.pools).map_err(ConfigError::Invalid)?;
        if let Some(k) = &self.kubernetes
            && let Some(p) = self.pools.iter().find(|p| p.listener == k.listener)
        {
            return bad(format!(
                "pool {} listens on {}, the kubernetes gateway listener",
                p.name, p.listener
            ));
        }
        if self.residency_shards == 0 {
            return bad("residency_shards must be > 0".into());
        }
        Ok(())
    }

    pub fn silence(&self) -> Duration {
        Duration::from_millis(self.replica_silence_ms)
    }
}

/// The rules every set of pools served together keeps (the file's alone, and the file's with
/// those from Kubernetes): names non-empty, unique and without '/' (resource names are
/// `<pool>/<replica>/<shard>`), one pool per model (replicas join a pool by model).
pub fn check_pools(pools: &[PoolSpec]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    let mut models = std::collections::HashSet::new();
    for p in pools {
        if p.name.is_empty() || p.name.contains('/') {
            return Err(format!(
                "pool name {:?} must be non-empty and have no '/'",
                p.name
            ));
        }
        if !names.insert(&p.name) {
            return Err(format!("pool {} defined twice", p.name));
        }
        if !models.insert(&p.model) {
            return Err(format!("model {} served by two pools", p.model));
        }
        if p.chunk_bytes == 0 {
            return Err(format!("pool {}: chunk_bytes must be > 0", p.name));
        }
        if let Some(s) = &p.strategy {
            s.check().map_err(|m| format!("pool {}: {m}", p.name))?;
        }
    }
    Ok(())
}

impl StrategySpec {
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("strategy name is empty".into());
        }
        if let Some(h) = &self.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("sha256 {h:?} is not 64 hex digits"));
        }
        if !(self.params.is_null() || self.params.is_object()) {
            return Err("params must be a JSON object".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_rejects_duplicates() {
        let yaml = r#"
pools:
  - name: p
    model: m
    listener: 127.0.0.1:10000
    strategy: { name: kv-aware, module: x.wasm, params: { alpha: 1 } }
"#;
        let c: Config = serde_yaml::from_str(yaml).expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.pools[0].chunk_bytes, 256);
        assert_eq!(c.grpc.ip().to_string(), "127.0.0.1");
        assert!(c.admin.ip().is_loopback());

        let dup = format!("{yaml}  - name: p\n    model: m2\n    listener: 127.0.0.1:10001\n");
        let c: Config = serde_yaml::from_str(&dup).expect("parse");
        assert!(c.validate().is_err());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/local.yaml");
        let c = Config::load(&path).expect("config/local.yaml loads");
        assert_eq!(
            c.pools[0].strategy.as_ref().map(|s| s.name.as_str()),
            Some("kv-aware")
        );
    }

    #[test]
    fn rejects_bad_sha_and_unknown_fields() {
        let s = StrategySpec {
            name: "x".into(),
            module: "m".into(),
            sha256: Some("abc".into()),
            params: serde_json::Value::Null,
        };
        assert!(s.check().is_err());
        let yaml = "pools: []\nbogus: 1\n";
        assert!(serde_yaml::from_str::<Config>(yaml).is_err());
    }
}
