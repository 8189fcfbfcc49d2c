//! The decoder on a GPU (a build with the `cuda` feature, on a machine with one): the same
//! logits as the CPU on the same F32 weights, paged and chunked, batched decode included, and a
//! cached prefix equals recomputing it. Without a GPU the tests print SKIP and return (set
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
