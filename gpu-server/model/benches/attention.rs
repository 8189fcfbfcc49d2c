//! One decode step at a long context: attention on the host pool's f16 blocks in place (the
//! CPU path for steps of a few tokens) against the matmul path over the gathered context (the
//! tensor-row pool, which runs the GPU's way on the CPU), on the same model and context.
//!
//! The model has SmolLM2-135M's attention shape (9 heads, 3 KV heads, head dim 64) and four
//! layers with f32 weights, a narrow FFN and a small vocabulary, so that at a long context
//! the step's time is mostly attention.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kvmesh_gpu_server_model::tiny::{TinySpec, random_model};
use kvmesh_gpu_server_model::{KvPool, Loaded, SeqInput};
use std::hint::black_box;

const BLOCK: usize = 16;

fn prefill(m: &Loaded, pool: &mut KvPool, tokens: &[u32], blocks: &[u32]) {
    for (i, chunk) in tokens.chunks(256).enumerate() {
        let input = SeqInput {
            tokens: chunk,
            start: i * 256,
            blocks,
            all_logits: false,
        };
        m.model.forward(&[input], pool).expect("prefill");
    }
}

fn bench(c: &mut Criterion) {
    let spec = TinySpec {
        layers: 4,
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        intermediate: 64,
        dtype: GgmlDType::F32,
        ..TinySpec::default()
    };
    let m = random_model(&spec, &Device::Cpu, DType::F32).expect("model");
    let mut group = c.benchmark_group("decode_step_4_layers");
    for ctx in [256usize, 2000] {
        let tokens: Vec<u32> = (0..ctx + 1).map(|i| ((i * 37 + 11) % 256) as u32).collect();
        let n_blocks = (ctx + 1).div_ceil(BLOCK);
        // Blocks in no particular order, as a pool that has served a while hands them out.
        let blocks: Vec<u32> = (0..n_blocks as u32).rev().collect();
        let pools = [
            (
                "paged_f16_in_place",
                KvPool::new(m.model.config(), n_blocks, BLOCK),
            ),
            (
                "gather_then_matmul",
                KvPool::new_rows(m.model.config(), n_blocks, BLOCK, &Device::Cpu).expect("pool"),
            ),
        ];
        for (name, mut pool) in pools {
            prefill(&m, &mut pool, &tokens[..ctx], &blocks);
            group.bench_with_input(BenchmarkId::new(name, ctx), &ctx, |b, &ctx| {
                b.iter(|| {
                    let input = SeqInput {
                        tokens: &tokens[ctx..ctx + 1],
                        start: ctx,
                        blocks: &blocks,
                        all_logits: false,
                    };
                    black_box(m.model.forward(&[input], &mut pool).expect("step"))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
