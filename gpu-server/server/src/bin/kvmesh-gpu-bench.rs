//! `kvmesh-gpu-bench`: end-to-end engine figures on a real model (prefill and decode
//! throughput, TTFT of a repeated long prompt, throughput of concurrent streams, KV bytes per
//! token), printed as JSON. Compare with `gpu-server/server/benches/llamacpp_bench.py` run
//! on the same GGUF in the same session (see docs/benchmarks.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kvmesh_gpu_server_engine::{
    Engine, EngineConfig, EngineHandle, Event, Request, SamplingParams,
};
use kvmesh_gpu_server_model::LoadOptions;
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Repetitions of each measurement (the median is reported, with min and max).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Leave Q4_1 weights to candle's matmul instead of kvmesh's AVX2 kernel (the baseline).
    #[arg(long)]
    candle_q4_1: bool,
}

struct Timing {
    first: f64,
    last: f64,
    tokens: usize,
    cached: usize,
}

fn run(e: &EngineHandle, prompt: &[u32], max_tokens: usize) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    e.submit(Request {
        prompt: prompt.to_vec(),
        params,
        chunks: Vec::new(),
        events: tx,
        logits: None,
    })
    .unwrap_or_else(|err| panic!("submit: {err}"));
    rx
}

fn wait(mut rx: mpsc::UnboundedReceiver<Event>, t0: Instant) -> Timing {
    let mut t = Timing {
        first: 0.0,
        last: 0.0,
        tokens: 0,
        cached: 0,
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { cached_tokens } => t.cached = cached_tokens,
            Event::Token(_) => {
                let now = t0.elapsed().as_secs_f64();
                if t.tokens == 0 {
                    t.first = now;
                }
                t.last = now;
                t.tokens += 1;
            }
            Event::Finished(_) => break,
            Event::Failed(m) => panic!("{m}"),
        }
    }
    t
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1], "n": v.len()})
}

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % (vocab - 300) + 200) as u32)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = kvmesh_gpu_server_model::load_with(
        &args.model,
        LoadOptions {
            fast_q4_1: !args.candle_q4_1,
        },
    )?;
    let cfg = loaded.model.config().clone();
    let e = Engine::start(
        Arc::new(loaded.model),
        loaded.tokenizer.stop_ids.clone(),
        EngineConfig {
            num_blocks: 1024,
            step_tokens: 512,
            ..EngineConfig::default()
        },
    );
    let v = cfg.vocab_size;
    // Warm-up (allocations, thread pool).
    wait(run(&e, &tokens(64, 99, v), 4), Instant::now());

    let mut prefill = Vec::new();
    for r in 0..args.reps {
        e.clear_cache();
        let p = tokens(512, r, v);
        let t0 = Instant::now();
        let t = wait(run(&e, &p, 1), t0);
        prefill.push(512.0 / t.first);
    }
    let mut decode = Vec::new();
    for r in 0..args.reps {
        let p = tokens(16, 10 + r, v);
        let t0 = Instant::now();
        let t = wait(run(&e, &p, 129), t0);
        decode.push((t.tokens - 1) as f64 / (t.last - t.first));
    }
    e.clear_cache();
    let long = tokens(2000, 42, v);
    let t0 = Instant::now();
    let cold = wait(run(&e, &long, 1), t0);
    let mut warm = Vec::new();
    let mut warm_cached = 0;
    for _ in 0..args.reps {
        let t0 = Instant::now();
        let t = wait(run(&e, &long, 1), t0);
        warm.push(t.first * 1000.0);
        warm_cached = t.cached;
    }
    let mut conc = Vec::new();
    for r in 0..args.reps {
        let t0 = Instant::now();
        let rxs: Vec<_> = (0..4)
            .map(|i| run(&e, &tokens(32, 100 + r * 4 + i, v), 128))
            .collect();
        let n: usize = rxs.into_iter().map(|rx| wait(rx, t0).tokens).sum();
        conc.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    let st = e.status();
    let out = json!({
        "engine": "kvmesh-gpu-server",
        "threads": candle_core::utils::get_num_threads(),
        "fast_q4_1": !args.candle_q4_1,
        "prefill_512_tok_per_s": stats(prefill),
        "decode_128_tok_per_s": stats(decode),
        "ttft_2000_cold_ms": cold.first * 1000.0,
        "ttft_2000_cached_ms": stats(warm),
        "ttft_2000_cached_tokens": warm_cached,
        "concurrent_4x128_tok_per_s": stats(conc),
        "kv_pool_bytes_per_token": st.pool_bytes_per_token,
        "model_kv_bytes_per_token_f16": cfg.kv_bytes_per_token_f16(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
