//! The decoder on a GPU (a build with the `cuda` feature, on a machine with one): the same
//! logits as the CPU on the same F32 weights, paged and chunked, batched decode included, and a
//! cached prefix equals recomputing it; decode steps on kvmesh's kernels equal candle's ops.
//! Without a GPU the tests print SKIP and return (set
//! `KVMESH_REQUIRE_GPU=1` to make that a failure).

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use kvmesh_gpu_server_model::tiny::{TinySpec, write_gguf};
use kvmesh_gpu_server_model::{KvPool, LoadOptions, Loaded, SeqInput, load_with, max_abs_diff};

fn gpu() -> Option<Device> {
    if kvmesh_gpu_server_model::cuda_device_present() {
        return Some(kvmesh_gpu_server_model::device("cuda").unwrap());
    }
    assert!(
        std::env::var_os("KVMESH_REQUIRE_GPU").is_none(),
        "no CUDA device (KVMESH_REQUIRE_GPU is set)"
    );
    eprintln!("SKIP: no CUDA device");
    None
}

fn pair(dev: &Device) -> (Loaded, Loaded) {
    let p = std::env::temp_dir().join(format!("kvmesh-cuda-{}.gguf", std::process::id()));
    let spec = TinySpec {
        layers: 3,
        hidden: 128,
        heads: 8,
        kv_heads: 2,
        intermediate: 256,
        dtype: GgmlDType::F32,
        ..TinySpec::default()
    };
    write_gguf(&p, &spec).unwrap();
    let on = |d: &Device| {
        load_with(
            &p,
            LoadOptions {
                device: d.clone(),
                weights: Some(candle_core::DType::F32),
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let r = (on(&Device::Cpu), on(dev));
    std::fs::remove_file(&p).unwrap();
    r
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 11) % 256) as u32)
        .collect()
}

/// Two sequences, chunked prefill then batched decode, on a pool on the model's device.
fn script(m: &Loaded) -> Vec<Tensor> {
    let mut pool = KvPool::for_model(&m.model, 8, 16).unwrap();
    assert_eq!(pool.on_device(), !m.model.device().is_cpu());
    common::two_sequences(m, &mut pool, &prompt(40, 1), &prompt(23, 2))
}

#[test]
fn gpu_logits_equal_cpu_logits() {
    let Some(dev) = gpu() else { return };
    let (cpu, gpu) = pair(&dev);
    for (i, (c, g)) in script(&cpu).iter().zip(script(&gpu)).enumerate() {
        let d = max_abs_diff(c, &g).unwrap();
        assert!(
            d < 1e-3,
            "step output {i}: GPU and CPU logits differ by {d}"
        );
    }
}

#[test]
fn gpu_cached_prefix_equals_recompute() {
    let Some(dev) = gpu() else { return };
    let (_, m) = pair(&dev);
    let t = prompt(50, 3);
    let blocks = [3u32, 1, 6, 0];
    let mut one = KvPool::for_model(&m.model, 8, 16).unwrap();
    let whole = m
        .model
        .forward(
            &[SeqInput {
                tokens: &t,
                start: 0,
                blocks: &blocks,
                all_logits: true,
            }],
            &mut one,
        )
        .unwrap();
    // The first 32 tokens' KV computed, then only the rest run against it.
    let mut two = KvPool::for_model(&m.model, 8, 16).unwrap();
    for (from, to) in [(0, 32), (32, 50)] {
        let r = m
            .model
            .forward(
                &[SeqInput {
                    tokens: &t[from..to],
                    start: from,
                    blocks: &blocks,
                    all_logits: true,
                }],
                &mut two,
            )
            .unwrap();
        let want = whole[0].narrow(0, from, to - from).unwrap();
        let d = max_abs_diff(&want, &r[0]).unwrap();
        assert!(
            d < 1e-4,
            "tokens {from}..{to}: cached and recomputed differ by {d}"
        );
    }
    // A block copied on the device (the engine's private copy of a shared last block).
    assert!(two.copy_block(1, 7));
    assert!(!two.copy_block(1, 8));
}

/// Decode steps on kvmesh's kernels against candle's ops on the same weights and KV, batched
/// and alone, over contexts of one and several attention chunks (256 positions each).
#[test]
fn gpu_decode_kernels_equal_candle_ops() {
    let Some(dev) = gpu() else { return };
    let (_, m) = pair(&dev);
    assert!(
        m.model.decode_kernels(),
        "F32 weights on a GPU decode on the kernels"
    );
    let lens = [3usize, 255, 600];
    let per: Vec<u32> = lens.iter().map(|n| (n + 1).div_ceil(16) as u32).collect();
    let mut pool = KvPool::for_model(&m.model, per.iter().sum::<u32>() as usize, 16).unwrap();
    let mut tables = Vec::new();
    let mut next = 0;
    for n in &per {
        tables.push((next..next + n).collect::<Vec<u32>>());
        next += n;
    }
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| prompt(n + 1, n)).collect();
    for i in 0..lens.len() {
        let s = SeqInput {
            tokens: &prompts[i][..lens[i]],
            start: 0,
            blocks: &tables[i],
            all_logits: false,
        };
        m.model.forward(&[s], &mut pool).unwrap();
    }
    for which in [vec![0usize, 1, 2], vec![2], vec![1]] {
        let step = |pool: &mut KvPool, on: bool| {
            m.model.set_decode_kernels(on);
            let batch: Vec<SeqInput<'_>> = which
                .iter()
                .map(|&i| SeqInput {
                    tokens: &prompts[i][lens[i]..],
                    start: lens[i],
                    blocks: &tables[i],
                    all_logits: false,
                })
                .collect();
            m.model.forward(&batch, pool).unwrap()
        };
        let (k, c) = (step(&mut pool, true), step(&mut pool, false));
        m.model.set_decode_kernels(true);
        for ((a, b), &i) in k.iter().zip(&c).zip(&which) {
            let d = max_abs_diff(a, b).unwrap();
            assert!(
                d < 1e-3,
                "context {}: kernels and candle differ by {d}",
                lens[i] + 1
            );
        }
    }
}
