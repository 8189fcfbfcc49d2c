//! The model server reporting to the real control plane over real gRPC on 127.0.0.1: it
//! registers into the pool serving its model, its device-tier residency reaches the registry
//! after a request and leaves it when the cache is cleared, and its load carries the pool size.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_control_plane_api::ConnState;
use kvmesh_gpu_server_engine::EngineConfig;
use kvmesh_gpu_server_model::tiny::{TinySpec, write_gguf};
use kvmesh_gpu_server_server::reporter::{ReportTarget, StateReporter};
use kvmesh_gpu_server_server::{AppState, ServerConfig, serve};
use kvmesh_plugins_sdk::chunk;
use serde_json::{Value, json};

const MODEL: &str = "tiny";
const KV_BLOCKS: usize = 96;

/// Starts the control plane in-process with one pool for `MODEL` (no strategy: only the
/// registry is exercised) and returns its (gRPC, admin) addresses.
async fn control_plane(dir: &std::path::Path) -> kvmesh_control_plane_server::Bound {
    let cfg = dir.join("cp.yaml");
    std::fs::write(
        &cfg,
        format!(
            "grpc: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwarmup_ms: 0\nmodule_store: {}\n\
             pools:\n  - name: tiny\n    model: {MODEL}\n    listener: 127.0.0.1:0\n",
            dir.join("modules").display()
        ),
    )
    .unwrap();
    let config = kvmesh_control_plane_server::Config::load(&cfg).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        kvmesh_control_plane_server::serve(config, |b| {
            let _ = tx.send(b);
        })
        .await
        .unwrap();
    });
    rx.await.unwrap()
}

async fn replicas(http: &reqwest::Client, admin: std::net::SocketAddr) -> Vec<Value> {
    http.get(format!("http://{admin}/v1/replicas"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls the control plane's replica list until `ok` holds for replica `id`.
async fn wait_replica(
    http: &reqwest::Client,
    admin: std::net::SocketAddr,
    id: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = replicas(http, admin).await;
        if let Some(r) = list.iter().find(|r| r["id"] == id)
            && ok(r)
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "control plane never showed {what}; replicas: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn device_chunks(r: &Value) -> u64 {
    // Tier numbers are the proto's: TIER_DEVICE = 1.
    r["resident_chunks"]["1"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_registers_and_streams_residency_and_load_to_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let cp = control_plane(dir.path()).await;

    let model = dir.path().join("tiny.gguf");
    write_gguf(&model, &TinySpec::default()).unwrap();
    let cfg = ServerConfig {
        model_name: MODEL.into(),
        chunk_bytes: 256,
        max_tokens_default: 4,
        engine: EngineConfig {
            num_blocks: KV_BLOCKS,
            ..EngineConfig::default()
        },
    };
    let state: Arc<AppState> = AppState::load(&model, &cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state.clone()));
    let reporter = StateReporter::spawn(
        &state.engine,
        ReportTarget {
            endpoint: format!("http://{}", cp.grpc),
            replica_id: "r1".into(),
            address: addr.to_string(),
            model: MODEL.into(),
            chunk_bytes: 256,
        },
    );
    let mut conn = reporter.state();
    tokio::time::timeout(
        Duration::from_secs(20),
        conn.wait_for(|s| matches!(s, ConnState::Registered { .. })),
    )
    .await
    .expect("registration timed out")
    .unwrap();

    let http = reqwest::Client::new();
    let r = wait_replica(&http, cp.admin, "r1", "the registered replica", |r| {
        r["connected"] == true
    })
    .await;
    assert_eq!(r["pool"], "tiny");
    assert_eq!(r["address"], addr.to_string());
    assert_eq!(device_chunks(&r), 0, "nothing is cached yet: {r}");

    // Three full 256-byte chunks of prompt text; the server caches and reports them.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(18);
    let want = chunk::chunk_hashes(MODEL, prompt.as_bytes(), 256).len();
    assert_eq!(want, 3);
    let resp = http
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served = state.engine.status().resident_chunks.len();
    assert_eq!(served, want, "the server itself holds every full chunk");
    wait_replica(&http, cp.admin, "r1", "the prompt's chunks", |r| {
        device_chunks(r) == want as u64
    })
    .await;
    // The idle load follows (it may trail the residency delta), with the device pool's
    // capacity.
    let r = wait_replica(&http, cp.admin, "r1", "the idle load", |r| {
        r["waiting"] == 0 && r["running"] == 0 && r["queued_prefill_tokens"] == 0
    })
    .await;
    assert_eq!(r["kv"][0]["tier"], 1);
    assert_eq!(r["kv"][0]["capacity"], KV_BLOCKS);
    assert!(r["kv"][0]["used"].as_u64().unwrap() >= 3, "{r}");

    // Dropping the cache is reported too.
    state.engine.clear_cache();
    wait_replica(&http, cp.admin, "r1", "the cleared cache", |r| {
        device_chunks(r) == 0
    })
    .await;
}
