//! Hot paths of the contract crate: prompt parsing, chunk hashing, `select`,
//! placing a new prefix.
//!
//! `cargo bench -p kvmesh-plugins-sdk --bench sdk`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::policy::{
    Event, KvAware, Placement, Policy, PrefixAware, PrefixAwareConfig, Request, RoundRobin,
};
use kvmesh_plugins_sdk::prompt::{Api, parse};
use kvmesh_plugins_sdk::proto::{self, Tier};
use kvmesh_plugins_sdk::snapshot::Snapshot;

fn chat_body(bytes: usize) -> Vec<u8> {
    let text: String = (0..bytes)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": "smollm2",
        "stream": true,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
    }))
    .expect("json")
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    for kb in [1usize, 16, 100] {
        let text = vec![b'x'; kb * 1024];
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("chunk_hashes", format!("{kb}KiB")),
            &text,
            |b, t| {
                b.iter(|| chunk_hashes("smollm2", black_box(t), 256));
            },
        );
        let body = chat_body(kb * 1024);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("parse_and_hash", format!("{kb}KiB")),
            &body,
            |b, body| {
                b.iter(|| {
                    let p = parse(Api::ChatCompletions, black_box(body)).expect("parse");
                    chunk_hashes(&p.model, &p.canonical[0], 256)
                });
            },
        );
    }
    g.finish();
}

/// A pool of `n` replicas, each holding 64 prefixes of 16 chunks (device)
/// and another 64 on host.
fn pool(n: usize) -> Snapshot {
    let mut s = Snapshot::new("smollm2", 256);
    for i in 0..n {
        s.upsert(&proto::ReplicaInfo {
            id: format!("r{i}"),
            address: format!("10.0.{}.{}:8000", i / 256, i % 256),
            load: Some(proto::Load {
                queued_prefill_tokens: (i as u64 * 37) % 2000,
                running: (i % 7) as u32,
                ..Default::default()
            }),
        });
        for p in 0..128u64 {
            let prefix = (i as u64 * 131 + p) % (n as u64 * 32);
            let chunks: Vec<u64> = (0..16).map(|k| prefix << 8 | k).collect();
            let tier = if p < 64 { Tier::Device } else { Tier::Host };
            s.add_resident(&format!("r{i}"), tier as i32, &chunks);
        }
    }
    s
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [8usize, 64, 256] {
        let s = pool(n);
        let chunks: Vec<u64> = (0..32).map(|k| 5u64 << 8 | k).collect();
        let req = Request {
            chunks: &chunks,
            prompt_bytes: 32 * 256,
        };
        let mut pa = PrefixAware::default();
        let warm = pa.select(&s, &req);
        pa.observe(
            &s,
            &Event::Routed {
                request: &req,
                choice: &warm,
            },
        );
        let policies: Vec<(&str, Box<dyn Policy>)> = vec![
            ("round-robin", Box::new(RoundRobin::default())),
            ("prefix-aware", Box::new(pa)),
            ("kv-aware", Box::new(KvAware::default())),
        ];
        for (name, p) in &policies {
            g.bench_with_input(BenchmarkId::new(*name, n), &s, |b, s| {
                b.iter(|| p.select(black_box(s), black_box(&req)));
            });
        }
    }
    g.finish();
}

/// Placing a new prefix: prefix-aware's `Least` counts the prefixes each
/// replica holds (1,024 remembered, most of them resident) and its chunks;
/// `Rendezvous` counts nothing, the baseline.
fn place(c: &mut Criterion) {
    let mut g = c.benchmark_group("place");
    for n in [8usize, 64] {
        let s = pool(n);
        let fresh: Vec<u64> = (0..32).map(|k| (1u64 << 40) | k).collect();
        let req = Request {
            chunks: &fresh,
            prompt_bytes: 32 * 256,
        };
        for placement in [Placement::Least, Placement::Rendezvous] {
            let mut p = PrefixAware::new(PrefixAwareConfig {
                placement,
                ..PrefixAwareConfig::default()
            })
            .expect("valid config");
            // 1,024 prefixes routed, those under n * 32 resident somewhere.
            for prefix in 0..1024u64 {
                let chunks: Vec<u64> = (0..16).map(|k| prefix << 8 | k).collect();
                let r = Request {
                    chunks: &chunks,
                    prompt_bytes: 16 * 256,
                };
                let choice = p.select(&s, &r);
                p.observe(
                    &s,
                    &Event::Routed {
                        request: &r,
                        choice: &choice,
                    },
                );
                if let Some(replica) = choice.primary {
                    p.observe(&s, &Event::Finished { replica });
                }
            }
            let name = format!("{placement:?}").to_lowercase();
            g.bench_with_input(BenchmarkId::new(name, n), &s, |b, s| {
                b.iter(|| p.select(black_box(s), black_box(&req)));
            });
        }
    }
    g.finish();
}

/// Rebuilding a filter's view from a snapshot message (what a worker does
/// when it falls behind the delta ring): 64 replicas x 10,000 chunks.
fn reload(c: &mut Criterion) {
    let mut s = Snapshot::new("smollm2", 256);
    for i in 0..64u64 {
        let id = format!("r{i}");
        s.upsert(&proto::ReplicaInfo {
            id: id.clone(),
            address: format!("10.0.0.{i}:8000"),
            load: None,
        });
        let chunks: Vec<u64> = (0..10_000u64).map(|k| (i << 32) | k).collect();
        s.add_resident(&id, Tier::Device as i32, &chunks);
    }
    let msg = s.to_proto();
    let bytes = prost::Message::encode_to_vec(&msg);
    let mut g = c.benchmark_group("reload");
    g.sample_size(10);
    g.bench_function("decode_and_index_64x10k", |b| {
        b.iter(|| {
            let m: proto::PoolSnapshot =
                prost::Message::decode(black_box(bytes.as_slice())).expect("decode");
            Snapshot::from_proto(&m)
        });
    });
    g.finish();
}

criterion_group!(benches, hashing, select, place, reload);
criterion_main!(benches);
