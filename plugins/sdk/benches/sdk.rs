//! Hot paths of the contract crate: prompt parsing, chunk hashing, `select`.
//!
//! `cargo bench -p kvmesh-plugins-sdk --bench sdk`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::policy::{Event, KvAware, Policy, PrefixAware, Request, RoundRobin};
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

criterion_group!(benches, hashing, select);
criterion_main!(benches);
