//! Shared pieces of the plugin conformance and Envoy differential tests: which
//! plugins exist, pool states published the way the state pump publishes
//! them, and request bodies with known prompt identities.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kvmesh_host_runtime::{Host, HostError, Plugin, PluginConfig, SharedVm};
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::prompt::{Api, parse};
use kvmesh_plugins_sdk::proto;
use kvmesh_plugins_sdk::state::StateWriter;
use serde::{Deserialize, Serialize};

/// The pool every scenario uses.
pub const POOL: &str = "pool";
/// The model every scenario uses.
pub const MODEL: &str = "conformance-model";
/// Text chunk size.
pub const CHUNK_BYTES: u32 = 256;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The routing plugins: every cdylib crate under `plugins/` built on the
/// shared routing filter (`kvmesh-plugins-filter`), by module name
/// (`kvmesh-plugins-round-robin` -> `round-robin`). The state pump and the
/// diagnostic state probe are cdylibs too but route nothing.
pub fn plugin_names() -> Vec<String> {
    let mut names = Vec::new();
    let Ok(dirs) = std::fs::read_dir(workspace_root().join("plugins")) else {
        return names;
    };
    for dir in dirs.flatten() {
        let Ok(toml) = std::fs::read_to_string(dir.path().join("Cargo.toml")) else {
            continue;
        };
        if !toml.contains("cdylib") || !toml.contains("kvmesh-plugins-filter") {
            continue;
        }
        let name = toml
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .map(|n| n.trim_start_matches("kvmesh-plugins-").to_owned());
        if let Some(n) = name {
            names.push(n);
        }
    }
    names.sort();
    names
}

/// The plugin configuration the control plane pushes for [`POOL`].
pub fn plugin_config() -> String {
    kvmesh_host_sim::default_plugin_config(POOL, CHUNK_BYTES)
}

/// Starts `workers` VMs of `target/plugins/<name>.wasm` sharing one `vm_id`.
pub fn start(host: &Host, name: &str, workers: usize) -> Result<Vec<Plugin>, HostError> {
    let module = host.load_file(kvmesh_host_runtime::locate_plugin(name)?)?;
    (0..workers)
        .map(|_| {
            host.start(
                &module,
                PluginConfig::new(&vm_id(name), plugin_config().as_bytes()).root_id(name),
            )
        })
        .collect()
}

/// The `vm_id` the VMs of plugin `name` share.
pub fn vm_id(name: &str) -> String {
    format!("kvmesh-{name}")
}

/// One replica of a scenario's pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    /// Replica id.
    pub id: String,
    /// host:port.
    pub address: String,
    /// Requests queued.
    pub waiting: u32,
    /// Requests running.
    pub running: u32,
    /// Prompt tokens queued for prefill.
    pub queued_prefill_tokens: u64,
    /// Resident chunks per tier: device, host, disk.
    pub resident: [Vec<u64>; 3],
}

impl ReplicaSpec {
    /// An idle replica `r<i>` at `10.0.0.<i+1>:8000` holding nothing.
    pub fn idle(i: usize) -> Self {
        Self {
            id: format!("r{i}"),
            address: format!("10.0.0.{}:8000", i + 1),
            waiting: 0,
            running: 0,
            queued_prefill_tokens: 0,
            resident: Default::default(),
        }
    }
}

/// The shared-data writes (key, value) that publish `replicas` as the state
/// of [`POOL`], in the order the state pump writes them (head last).
/// Each call is a new writer with a new epoch, as a restarted state pump is.
pub fn state_writes(replicas: &[ReplicaSpec]) -> Vec<(String, Vec<u8>)> {
    static EPOCH: AtomicU64 = AtomicU64::new(1);
    let mut w = StateWriter::new(POOL, EPOCH.fetch_add(1, Ordering::Relaxed));
    w.set_pool_state(&proto::PoolState {
        pool: POOL.to_owned(),
        model: MODEL.to_owned(),
        chunk_bytes: CHUNK_BYTES,
        replicas: replicas
            .iter()
            .map(|r| proto::ReplicaInfo {
                id: r.id.clone(),
                address: r.address.clone(),
                load: Some(proto::Load {
                    waiting: r.waiting,
                    running: r.running,
                    queued_prefill_tokens: r.queued_prefill_tokens,
                    kv: Vec::new(),
                }),
            })
            .collect(),
    });
    for r in replicas {
        w.set_shard(&proto::ResidencyShard {
            pool: POOL.to_owned(),
            replica_id: r.id.clone(),
            shard: 0,
            shard_count: 1,
            resident: r
                .resident
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.is_empty())
                .map(|(t, c)| proto::TierChunks {
                    tier: t as i32 + 1,
                    chunks: c.clone(),
                })
                .collect(),
        });
    }
    w.flush()
}

/// Publishes `replicas` into a `vm_id`'s shared data.
pub fn publish(vm: &SharedVm, replicas: &[ReplicaSpec]) {
    for (key, value) in state_writes(replicas) {
        // CAS 0: unconditional, as the state pump writes.
        let _ = vm.set(&key, &value, 0);
    }
}

/// A chat request body: a system prompt shared by a group, and a question.
pub fn chat_body(system: &str, question: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }))
    .unwrap_or_default()
}

/// The chunk hashes of a request body, as every part computes them.
pub fn chunks(path: &str, body: &[u8]) -> Vec<u64> {
    Api::from_path(path)
        .and_then(|api| parse(api, body).ok())
        .and_then(|p| p.canonical.into_iter().next().map(|c| (p.model, c)))
        .map(|(model, c)| chunk_hashes(&model, &c, CHUNK_BYTES))
        .unwrap_or_default()
}

/// A deterministic text of `bytes` bytes seeded by `seed`.
pub fn text(seed: u64, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("w{} ", x % 10_000));
    }
    s.truncate(bytes);
    s
}

/// One case of the committed differential corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Case {
    /// What it checks.
    pub name: String,
    /// Pool state.
    pub replicas: Vec<CaseReplica>,
    /// Request path.
    pub path: String,
    /// Request body (UTF-8 text; JSON or not).
    pub body: String,
}

/// A replica of a corpus case; residency is given as the number of leading
/// chunks of the case's own request held per tier, so the corpus stays
/// readable and follows the hash function.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseReplica {
    /// Replica id.
    pub id: String,
    /// host:port.
    pub address: String,
    /// Requests queued.
    #[serde(default)]
    pub waiting: u32,
    /// Requests running.
    #[serde(default)]
    pub running: u32,
    /// Prompt tokens queued for prefill.
    #[serde(default)]
    pub queued_prefill_tokens: u64,
    /// Leading chunks of the request resident on device, host, disk.
    #[serde(default)]
    pub prefix_chunks: [usize; 3],
}

impl Case {
    /// The pool state of this case.
    pub fn replica_specs(&self) -> Vec<ReplicaSpec> {
        let hashes = chunks(&self.path, self.body.as_bytes());
        self.replicas
            .iter()
            .map(|r| ReplicaSpec {
                id: r.id.clone(),
                address: r.address.clone(),
                waiting: r.waiting,
                running: r.running,
                queued_prefill_tokens: r.queued_prefill_tokens,
                resident: r
                    .prefix_chunks
                    .map(|n| hashes[..n.min(hashes.len())].to_vec()),
            })
            .collect()
    }
}

/// The committed corpus (`corpus/differential.json`).
pub fn corpus() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/differential.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The primary endpoint in a destination header value.
pub fn primary(header: Option<&str>) -> Option<String> {
    header
        .and_then(|v| v.split(',').next())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
