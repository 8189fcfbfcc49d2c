//! Decisions per second of each routing plugin under wasmtime (the whole
//! request path: headers, body, parse, hash, state read, select, header
//! write) against the same work done natively with the SDK (parse, hash,
//! `Policy::select` + `observe`). The ratio is the wasm overhead.
//!
//! `cargo bench -p kvmesh-host-sim --bench decisions` (needs
//! `scripts/build-plugins.sh` first).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_host_runtime::{Host, HttpRequest, PluginConfig};
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::policy::{Event, Request, by_name};
use kvmesh_plugins_sdk::prompt::{Api, parse};
use kvmesh_plugins_sdk::proto;
use kvmesh_plugins_sdk::snapshot::Snapshot;
use kvmesh_plugins_sdk::state::StateWriter;

const POOL: &str = "bench";
const MODEL: &str = "bench-model";
const REPLICAS: usize = 16;

/// A pool of 16 replicas, each holding the first chunks of a few of the
/// benchmark's prompts, with uneven load.
fn state(bodies: &[Vec<u8>]) -> StateWriter {
    let mut w = StateWriter::new(POOL, 1);
    w.set_pool_state(&proto::PoolState {
        pool: POOL.to_owned(),
        model: MODEL.to_owned(),
        chunk_bytes: 256,
        replicas: (0..REPLICAS)
            .map(|i| proto::ReplicaInfo {
                id: format!("r{i}"),
                address: format!("10.0.0.{}:8000", i + 1),
                load: Some(proto::Load {
                    waiting: (i % 4) as u32,
                    running: 2,
                    queued_prefill_tokens: (i * 500) as u64,
                    kv: Vec::new(),
                }),
            })
            .collect(),
    });
    for (i, body) in bodies.iter().enumerate() {
        let p = parse(Api::ChatCompletions, body).expect("bench body parses");
        let chunks = chunk_hashes(&p.model, &p.canonical[0], 256);
        w.set_shard(&proto::ResidencyShard {
            pool: POOL.to_owned(),
            replica_id: format!("r{}", i % REPLICAS),
            shard: i as u32,
            shard_count: 64,
            resident: vec![proto::TierChunks {
                tier: 1,
                chunks: chunks[..chunks.len() / 2].to_vec(),
            }],
        });
    }
    w
}

fn bodies() -> Vec<Vec<u8>> {
    (0..32)
        .map(|i| {
            let system = format!("tenant {} ", i % 8).repeat(200);
            serde_json::to_vec(&serde_json::json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": format!("question number {i} about the cache")},
                ],
            }))
            .expect("json")
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let bodies = bodies();
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    for name in ["round-robin", "prefix-aware", "kv-aware"] {
        let path = match kvmesh_host_runtime::locate_plugin(name) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIP {name}: {e}");
                continue;
            }
        };
        let host = Host::new().expect("host");
        let module = host.load_file(&path).expect("module");
        let vm_id = format!("bench-{name}");
        let mut writer = state(&bodies);
        for (k, v) in writer.flush() {
            let _ = host.vm(&vm_id).set(&k, &v, 0);
        }
        let config = kvmesh_host_sim::default_plugin_config(POOL, 256);
        let mut plugin = host
            .start(
                &module,
                PluginConfig::new(&vm_id, config.as_bytes()).root_id(name),
            )
            .expect("plugin starts");
        let mut i = 0usize;
        group.bench_function(format!("{name}/wasm"), |b| {
            b.iter(|| {
                i += 1;
                let body = &bodies[i % bodies.len()];
                let out = plugin
                    .send(HttpRequest::post_json("/v1/chat/completions", body))
                    .expect("routed");
                black_box(out.request_headers.len())
            })
        });

        let snapshot = Snapshot::from_proto(&writer.snapshot());
        let mut policy = by_name(name, &serde_json::json!({})).expect("policy");
        let mut j = 0usize;
        group.bench_function(format!("{name}/native"), |b| {
            b.iter(|| {
                j += 1;
                let body = &bodies[j % bodies.len()];
                let p = parse(Api::ChatCompletions, body).expect("parses");
                let chunks = chunk_hashes(&p.model, &p.canonical[0], 256);
                let request = Request {
                    chunks: &chunks,
                    prompt_bytes: p.canonical[0].len(),
                };
                let choice = policy.select(&snapshot, &request);
                policy.observe(
                    &snapshot,
                    &Event::Routed {
                        request: &request,
                        choice: &choice,
                    },
                );
                black_box(choice.primary)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
