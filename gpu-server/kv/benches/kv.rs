//! Hot paths of the logical KV state: block hashing, prefix lookup, and a whole request's
//! allocate/seal/release cycle with a cache hit.

use criterion::{Criterion, criterion_group, criterion_main};
use kvmesh_gpu_server_kv::{BlockManager, BlockTable, KvConfig, block_hashes};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..2048).map(|i| (i * 7919) % 49152).collect();
    c.bench_function("block_hashes_2048_tokens", |b| {
        b.iter(|| block_hashes(black_box(&tokens), 16))
    });
    let mut m = BlockManager::new(KvConfig {
        block_tokens: 16,
        num_blocks: 1024,
    });
    let mut warm = BlockTable::new(16);
    warm.reserve(&mut m, tokens.len()).unwrap_or_default();
    let _ = warm.commit(&mut m, &tokens, tokens.len());
    warm.release(&mut m);
    c.bench_function("request_2048_tokens_prefix_hit", |b| {
        b.iter(|| {
            let mut t = BlockTable::new(16);
            let cached = t.adopt_prefix(&mut m, black_box(&tokens), tokens.len() - 1);
            let _ = t.reserve(&mut m, tokens.len());
            let _ = t.commit(&mut m, &tokens, tokens.len());
            t.release(&mut m);
            cached
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
