//! `kvmesh-gpu-bench`: end-to-end engine figures on a real model (prefill and decode
//! throughput, TTFT of a repeated long prompt, throughput of concurrent streams, KV bytes per
//! token), printed as JSON. Compare with `gpu-server/server/benches/llamacpp_bench.py` run
//! on the same GGUF in the same session (see docs/benchmarks.md).
//!
//! On a GPU (`--device cuda`, a build with the `cuda` feature) it also measures, in the same
//! run, what the goals are stated against: `--shape llama-3.1-8b` builds random weights
//! of that shape on the device; `--copy-peaks` measures device-to-device and pinned host copy
//! bandwidth and the HOST tier's own block copies; `--host-restore` times a long prefix
//! restored from the HOST tier against recomputing it; `--check-cpu` compares greedy tokens
//! with the CPU on the same weights and exits 1 on a difference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kvmesh_gpu_server_engine::{
    Engine, EngineConfig, EngineHandle, Event, FetchPolicy, Request, SamplingParams, TierConfig,
};
use kvmesh_gpu_server_model::{LoadOptions, Loaded, tiny};
use serde_json::{Value, json};
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
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Projection weights: `native` (the file's), `f16` or `f32`.
    #[arg(long, default_value = "native", value_parser = ["native", "f16", "f32"])]
    weights: String,
    /// Random weights of this shape built on the device (`llama-3.1-8b`, ...) instead of
    /// `--model`; `--weights` f16 unless given.
    #[arg(long)]
    shape: Option<String>,
    /// Prompt tokens of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Decode throughput at these numbers of concurrent streams (128 tokens each).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    streams: Vec<usize>,
    /// Tokens of the repeated long prompt (cold and cached TTFT).
    #[arg(long, default_value_t = 2000)]
    long_tokens: usize,
    /// KV blocks of the device pool.
    #[arg(long, default_value_t = 1024)]
    num_blocks: usize,
    /// TTFT of a `--restore-tokens` prefix restored from the HOST tier, against recomputing it.
    #[arg(long)]
    host_restore: bool,
    #[arg(long, default_value_t = 20_000)]
    restore_tokens: usize,
    /// GPU copy bandwidth peaks and the HOST tier's block copies (CUDA builds).
    #[arg(long)]
    copy_peaks: bool,
    /// Greedy tokens on this device against the CPU, F32 weights on both (exit 1 if they
    /// differ), and prefix-cached prefill against recompute.
    #[arg(long)]
    check_cpu: bool,
    /// Skip the throughput measurements (with --check-cpu, --check-kernels, --copy-peaks or
    /// --host-restore).
    #[arg(long)]
    no_throughput: bool,
    /// kvmesh's CUDA decode kernels: `on` (the default), `off` (candle's ops), or `both`: the
    /// throughput measured with each, side by side in one run.
    #[arg(long, default_value = "on", value_parser = ["on", "off", "both"])]
    kernels: String,
    /// Logits of decode steps on the kernels against candle's ops on the same weights and KV
    /// (exit 1 if they disagree).
    #[arg(long)]
    check_kernels: bool,
    /// Where a batch-1 decode step's time goes: the model's forward alone (no engine) and its
    /// projections alone, with the kernels on and off.
    #[arg(long)]
    profile: bool,
}

struct Timing {
    first: f64,
    last: f64,
    /// Seconds since the start of every token.
    times: Vec<f64>,
    ids: Vec<u32>,
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
        times: Vec::new(),
        ids: Vec::new(),
        cached: 0,
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { cached_tokens } => t.cached = cached_tokens,
            Event::Token(id) => {
                let now = t0.elapsed().as_secs_f64();
                if t.times.is_empty() {
                    t.first = now;
                }
                t.last = now;
                t.times.push(now);
                t.ids.push(id);
            }
            Event::Finished(_) => break,
            Event::Failed(m) => panic!("{m}"),
        }
    }
    t
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1], "n": v.len()})
}

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % (vocab - 300) + 200) as u32)
        .collect()
}

fn dtype(name: &str) -> Option<candle_core::DType> {
    match name {
        "f16" => Some(candle_core::DType::F16),
        "f32" => Some(candle_core::DType::F32),
        _ => None,
    }
}

fn load(args: &Args, device: &candle_core::Device, weights: &str) -> anyhow::Result<Loaded> {
    Ok(match &args.shape {
        Some(shape) => {
            let spec = tiny::TinySpec::shape(shape, candle_core::quantized::GgmlDType::F16, 7)
                .ok_or_else(|| anyhow::anyhow!("unknown shape {shape}"))?;
            let w = dtype(weights).unwrap_or(candle_core::DType::F16);
            tiny::random_model(&spec, device, w)?
        }
        None => kvmesh_gpu_server_model::load_with(
            &args.model,
            LoadOptions {
                fast_q4_1: !args.candle_q4_1,
                device: device.clone(),
                weights: dtype(weights),
            },
        )?,
    })
}

/// Aggregate decode tokens/s of `n` concurrent streams over the window in which all of them are
/// decoding (after the last first token, before the first last token).
fn streams(e: &EngineHandle, n: usize, salt: usize, vocab: usize) -> f64 {
    let t0 = Instant::now();
    // One reader a stream, so each token is timed as it arrives.
    let ts: Vec<Timing> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..n)
            .map(|i| run(e, &tokens(32, salt * 1000 + i, vocab), 128))
            .map(|rx| scope.spawn(move || wait(rx, t0)))
            .collect();
        readers
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| panic!("stream reader panicked"))
            })
            .collect()
    });
    let from = ts.iter().map(|t| t.first).fold(0.0, f64::max);
    let to = ts.iter().map(|t| t.last).fold(f64::INFINITY, f64::min);
    let inside: usize = ts
        .iter()
        .map(|t| t.times.iter().filter(|&&x| x > from && x <= to).count())
        .sum();
    inside as f64 / (to - from)
}

fn throughput(args: &Args, model: &Arc<kvmesh_gpu_server_model::Model>, stop: &[u32]) -> Value {
    let cfg = model.config().clone();
    let max_streams = args.streams.iter().copied().max().unwrap_or(1);
    let e = Engine::start(
        model.clone(),
        stop.to_vec(),
        EngineConfig {
            num_blocks: args.num_blocks,
            step_tokens: 512,
            max_running: max_streams.max(16),
            ..EngineConfig::default()
        },
    );
    let v = cfg.vocab_size;
    // Warm-up (allocations, thread pool, kernel loading).
    wait(run(&e, &tokens(64, 99, v), 4), Instant::now());
    let pt = args.prefill_tokens;
    let mut prefill = Vec::new();
    for r in 0..args.reps {
        e.clear_cache();
        let p = tokens(pt, r, v);
        let t0 = Instant::now();
        let t = wait(run(&e, &p, 1), t0);
        prefill.push(pt as f64 / t.first);
    }
    let mut decode = Vec::new();
    for r in 0..args.reps {
        let p = tokens(16, 10 + r, v);
        let t0 = Instant::now();
        let t = wait(run(&e, &p, 129), t0);
        decode.push((t.times.len() - 1) as f64 / (t.last - t.first));
    }
    e.clear_cache();
    let long = tokens(args.long_tokens, 42, v);
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
    let mut conc = serde_json::Map::new();
    for &n in &args.streams {
        let runs: Vec<f64> = (0..args.reps).map(|r| streams(&e, n, 100 + r, v)).collect();
        conc.insert(format!("{n}"), stats(runs));
    }
    let st = e.status();
    json!({
        "prefill_tok_per_s": stats(prefill),
        "prefill_tokens": pt,
        "decode_128_tok_per_s": stats(decode),
        "ttft_long_cold_ms": cold.first * 1000.0,
        "ttft_long_cached_ms": stats(warm),
        "long_tokens": args.long_tokens,
        "ttft_long_cached_tokens": warm_cached,
        "decode_tok_per_s_by_streams": conc,
        "kv_pool_bytes_per_token": st.pool_bytes_per_token,
        "model_kv_bytes_per_token_f16": cfg.kv_bytes_per_token_f16(),
    })
}

/// TTFT of a long prefix restored from the HOST tier against recomputing it: two documents
/// that each fill the device pool alternate, so every request after the first two finds its
/// document demoted to HOST by the other (fetch forced, so the copy path is what is timed).
fn host_restore(args: &Args, model: &Arc<kvmesh_gpu_server_model::Model>, stop: &[u32]) -> Value {
    let bt = 16;
    let n = args.restore_tokens;
    let blocks = n.div_ceil(bt);
    let e = Engine::start_tiered(
        model.clone(),
        stop.to_vec(),
        EngineConfig {
            num_blocks: blocks + 4,
            step_tokens: 512,
            max_running: 2,
            ..EngineConfig::default()
        },
        &TierConfig {
            host_blocks: 2 * blocks + 64,
            fetch: FetchPolicy::Always,
            ..TierConfig::default()
        },
    );
    let v = model.config().vocab_size;
    let docs = [tokens(n, 1, v), tokens(n, 2, v)];
    let ttft = |d: &[u32]| {
        let t0 = Instant::now();
        let t = wait(run(&e, d, 1), t0);
        (t.first * 1000.0, t.cached, t.ids)
    };
    wait(run(&e, &tokens(64, 99, v), 2), Instant::now());
    let mut recompute = Vec::new();
    let mut first_ids = [Vec::new(), Vec::new()];
    for r in 0..args.reps.max(2) {
        e.clear_cache();
        let (ms, _, ids) = ttft(&docs[r % 2]);
        recompute.push(ms);
        first_ids[r % 2] = ids;
    }
    e.clear_cache();
    ttft(&docs[0]);
    ttft(&docs[1]);
    let mut restore = Vec::new();
    let mut cached = Vec::new();
    let mut same = true;
    for r in 0..args.reps.max(2) {
        let (ms, c, ids) = ttft(&docs[r % 2]);
        restore.push(ms);
        cached.push(c);
        same &= ids == first_ids[r % 2];
    }
    let st = e.status();
    let speedup = median(&recompute) / median(&restore);
    json!({
        "tokens": n,
        "recompute_ttft_ms": stats(recompute),
        "host_restore_ttft_ms": stats(restore),
        "cached_tokens": cached,
        "restored_token_equals_recomputed": same,
        "speedup_median": speedup,
        "tiers": st.tiers.iter().filter(|t| t.enabled).map(|t| json!({
            "tier": t.tier, "counters": t.counters, "bytes": t.bytes,
        })).collect::<Vec<_>>(),
    })
}

/// One decode step over sequences whose contexts span one and several attention chunks, run on
/// the decode kernels and again on candle's ops: the logits must agree to the activations'
/// rounding and pick the same greedy token.
fn check_kernels(model: &kvmesh_gpu_server_model::Model) -> anyhow::Result<(Value, bool)> {
    use kvmesh_gpu_server_model::{KvPool, SeqInput, max_abs_diff};
    if !model.decode_kernels() {
        return Ok((json!({"used": false}), true));
    }
    let bt = 16;
    let lens = [5usize, 300, 700];
    let per: Vec<usize> = lens.iter().map(|n| (n + 1).div_ceil(bt)).collect();
    let mut pool = KvPool::for_model(model, per.iter().sum(), bt)?;
    let vocab = model.config().vocab_size;
    let mut tables = Vec::new();
    let mut next = 0u32;
    for &n in &per {
        tables.push((next..next + n as u32).collect::<Vec<u32>>());
        next += n as u32;
    }
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| tokens(n + 1, 7 + i, vocab))
        .collect();
    for ((p, n), blocks) in prompts.iter().zip(lens).zip(&tables) {
        let s = SeqInput {
            tokens: &p[..n],
            start: 0,
            blocks,
            all_logits: false,
        };
        model.forward(&[s], &mut pool)?;
    }
    let step = |pool: &mut KvPool,
                which: &[usize],
                on: bool|
     -> anyhow::Result<Vec<candle_core::Tensor>> {
        model.set_decode_kernels(on);
        let batch: Vec<SeqInput<'_>> = which
            .iter()
            .map(|&i| SeqInput {
                tokens: &prompts[i][lens[i]..],
                start: lens[i],
                blocks: &tables[i],
                all_logits: false,
            })
            .collect();
        let out = model.forward(&batch, pool);
        model.set_decode_kernels(true);
        Ok(out?)
    };
    let mut ok = true;
    let mut rows = Vec::new();
    for which in [vec![0usize, 1, 2], vec![2], vec![0]] {
        let k = step(&mut pool, &which, true)?;
        let c = step(&mut pool, &which, false)?;
        for ((a, b), &i) in k.iter().zip(&c).zip(&which) {
            let diff = max_abs_diff(a, b)?;
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            let argmax = |t: &candle_core::Tensor| -> anyhow::Result<u32> {
                Ok(t.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
            };
            let same = argmax(a)? == argmax(b)?;
            let pass = same && diff <= 1e-2 * scale.max(1.0);
            ok &= pass;
            rows.push(json!({
                "batch": which.len(), "context": lens[i] + 1, "max_abs_diff": diff,
                "max_abs_logit": scale, "same_greedy_token": same, "pass": pass,
            }));
        }
    }
    Ok((json!({"used": true, "steps": rows, "all_pass": ok}), ok))
}

/// A batch-1 decode step taken apart: `model.forward` alone (no engine, no sampling) over 92
/// steps after 4 of warm-up, and the step's projections alone (every weight read once), with the decode kernels
/// on and then off.
fn profile(model: &kvmesh_gpu_server_model::Model) -> anyhow::Result<Value> {
    use kvmesh_gpu_server_model::{KvPool, SeqInput};
    let bytes = model.projection_bytes() as f64;
    let vocab = model.config().vocab_size;
    let mut out = serde_json::Map::new();
    for on in [true, false] {
        model.set_decode_kernels(on);
        let mut proj = Vec::new();
        for r in 0..12 {
            let t = Instant::now();
            model.run_projections(1)?;
            if r >= 2 {
                proj.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let bt = 16;
        let mut pool = KvPool::for_model(model, 8, bt)?;
        let blocks: Vec<u32> = (0..8).collect();
        let prompt = tokens(16, 5, vocab);
        let first = SeqInput {
            tokens: &prompt,
            start: 0,
            blocks: &blocks,
            all_logits: false,
        };
        model.forward(&[first], &mut pool)?;
        let mut steps = Vec::new();
        let mut tok = [prompt[0]];
        for p in 16..16 + 96 {
            let t = Instant::now();
            let s = SeqInput {
                tokens: &tok,
                start: p,
                blocks: &blocks,
                all_logits: false,
            };
            let logits = model.forward(&[s], &mut pool)?;
            tok[0] = logits[0].flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            if p >= 20 {
                steps.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let pm = median(&proj);
        out.insert(
            if on { "kernels" } else { "candle_ops" }.into(),
            json!({
                "forward_step_ms": stats(steps),
                "projections_ms": stats(proj),
                "projections_gb_per_s": bytes / pm / 1e6,
            }),
        );
    }
    model.set_decode_kernels(true);
    Ok(Value::Object(out))
}

/// Greedy tokens on `device` and on the CPU, F32 weights on both, for a few prompts; and on
/// `device`, a prompt's tokens recomputed against served from the prefix cache.
fn check_cpu(args: &Args, device: &candle_core::Device) -> anyhow::Result<(Value, bool)> {
    let opts = |d: &candle_core::Device| LoadOptions {
        fast_q4_1: false,
        device: d.clone(),
        weights: Some(candle_core::DType::F32),
    };
    let cpu = kvmesh_gpu_server_model::load_with(&args.model, opts(&candle_core::Device::Cpu))?;
    let dev = kvmesh_gpu_server_model::load_with(&args.model, opts(device))?;
    let tok = &cpu.tokenizer;
    let engine = |m: kvmesh_gpu_server_model::Model, stop: Vec<u32>| {
        Engine::start(Arc::new(m), stop, EngineConfig::default())
    };
    let ed_kernels = dev.model.decode_kernels();
    let ec = engine(cpu.model, cpu.tokenizer.stop_ids.clone());
    let ed = engine(dev.model, dev.tokenizer.stop_ids.clone());
    let texts = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time, in a village at the edge of a great forest, there lived",
        "List three reasons why the sky is blue:\n1.",
    ];
    let mut ok = true;
    let mut rows = Vec::new();
    for t in texts {
        let p = tok.encode(t)?;
        let a = wait(run(&ec, &p, 32), Instant::now()).ids;
        let b = wait(run(&ed, &p, 32), Instant::now()).ids;
        let same = a == b;
        ok &= same;
        let agree = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        rows.push(json!({
            "prompt": t, "equal": same, "agreeing_prefix": agree,
            "cpu": tok.decode(&a), "device": tok.decode(&b),
        }));
    }
    // Prefix cache on the device: a 200-token prompt cold, then again (served from cache but
    // its last token), then extended by a suffix (cached prefix plus new tokens).
    let base: String = texts.concat().repeat(4);
    let p = tok.encode(&base)?;
    let p = &p[..p.len().min(200)];
    ed.clear_cache();
    let cold = wait(run(&ed, p, 32), Instant::now());
    let hot = wait(run(&ed, p, 32), Instant::now());
    let cpu_ref = wait(run(&ec, p, 32), Instant::now());
    let cached_ok = cold.ids == hot.ids && hot.cached > 0;
    ok &= cached_ok;
    let v = json!({
        "weights": "f32 on both",
        "device_decode_kernels": ed_kernels,
        "prompts": rows,
        "prefix_cache": {
            "prompt_tokens": p.len(),
            "cached_tokens": hot.cached,
            "recompute_equals_cached": cold.ids == hot.ids,
            "device_equals_cpu": cold.ids == cpu_ref.ids,
        },
        "all_equal": ok,
    });
    Ok((v, ok))
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // cudarc's pinned allocation is unsafe (uninitialised); copies write it first
fn copy_peaks(model: &kvmesh_gpu_server_model::Model) -> anyhow::Result<Value> {
    use kvmesh_gpu_server_engine::{BlockCopier, CudaCopier};
    use kvmesh_gpu_server_model::KvPool;
    let candle_core::Device::Cuda(dev) = model.device() else {
        anyhow::bail!("--copy-peaks needs a CUDA device");
    };
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let gb = |bytes: usize, secs: f64| bytes as f64 / secs / 1e9;
    // Device to device: 1 GiB, bytes read plus written.
    let n = 1usize << 30;
    let a = stream.alloc_zeros::<u8>(n)?;
    let mut b = stream.alloc_zeros::<u8>(n)?;
    let mut d2d = Vec::new();
    for i in 0..6 {
        stream.synchronize()?;
        let t = Instant::now();
        stream.memcpy_dtod(&a, &mut b)?;
        stream.synchronize()?;
        if i > 0 {
            d2d.push(gb(2 * n, t.elapsed().as_secs_f64()));
        }
    }
    // Pinned host <-> device, one 256 MiB copy.
    let hn = 256usize << 20;
    // SAFETY: the device-to-host copies write it; the first host-to-device copy sends whatever
    // bytes it holds, which only the timing sees.
    let mut h = unsafe { ctx.alloc_pinned_with_flags::<u8>(hn, 0) }?;
    let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
    for i in 0..6 {
        let mut dst = b.slice_mut(0..hn);
        let t = Instant::now();
        stream.memcpy_htod(&h, &mut dst)?;
        stream.synchronize()?;
        let up = t.elapsed().as_secs_f64();
        let src = a.slice(0..hn);
        let t = Instant::now();
        stream.memcpy_dtoh(&src, &mut h)?;
        stream.synchronize()?;
        if i > 0 {
            h2d.push(gb(hn, up));
            d2h.push(gb(hn, t.elapsed().as_secs_f64()));
        }
    }
    drop((a, b, h));
    // The HOST tier's own copies: 128 blocks each way through the engine's copier.
    let blocks = 128u32;
    let mut pool = KvPool::for_model(model, blocks as usize, 16)?;
    let bb = pool.block_bytes_len();
    let mut copier = CudaCopier::new(&pool).map_err(|e| anyhow::anyhow!(e))?;
    let mut host = copier.host_memory(blocks as usize * bb);
    let (mut t2h, mut t2d) = (Vec::new(), Vec::new());
    for i in 0..6 {
        model.device().synchronize()?;
        let t = Instant::now();
        copier.begin();
        for id in 0..blocks {
            let at = id as usize * bb;
            copier.to_host(&pool, id, &mut host.bytes_mut()[at..at + bb]);
        }
        copier.sync();
        let down = t.elapsed().as_secs_f64();
        let t = Instant::now();
        copier.begin();
        for id in 0..blocks {
            let at = id as usize * bb;
            copier.to_device(&host.bytes()[at..at + bb], &mut pool, id);
        }
        copier.end();
        model.device().synchronize()?;
        if i > 0 {
            t2h.push(gb(blocks as usize * bb, down));
            t2d.push(gb(blocks as usize * bb, t.elapsed().as_secs_f64()));
        }
    }
    Ok(json!({
        "d2d_gb_per_s_read_plus_written": stats(d2d),
        "tier_to_host_of_peak": median(&t2h) / median(&d2h),
        "tier_to_device_of_peak": median(&t2d) / median(&h2d),
        "pinned_h2d_gb_per_s": stats(h2d),
        "pinned_d2h_gb_per_s": stats(d2h),
        "tier_block_bytes": bb,
        "tier_to_host_gb_per_s": stats(t2h),
        "tier_to_device_gb_per_s": stats(t2d),
    }))
}

#[cfg(not(feature = "cuda"))]
fn copy_peaks(_model: &kvmesh_gpu_server_model::Model) -> anyhow::Result<Value> {
    anyhow::bail!("--copy-peaks needs a build with the cuda feature")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = kvmesh_gpu_server_model::device(&args.device)?;
    let mut out = serde_json::Map::new();
    out.insert("engine".into(), json!("kvmesh-gpu-server"));
    out.insert("device".into(), json!(args.device));
    out.insert(
        "threads".into(),
        json!(candle_core::utils::get_num_threads()),
    );
    let mut ok = true;
    if args.check_cpu {
        let (v, pass) = check_cpu(&args, &device)?;
        ok &= pass;
        out.insert("check_cpu".into(), v);
    }
    if !args.no_throughput
        || args.copy_peaks
        || args.host_restore
        || args.check_kernels
        || args.profile
    {
        let t = Instant::now();
        let loaded = load(&args, &device, &args.weights)?;
        let model = Arc::new(loaded.model);
        let stop = loaded.tokenizer.stop_ids.clone();
        let bytes = model.projection_bytes();
        out.insert(
            "model".into(),
            json!({
                "source": args.shape.clone().unwrap_or_else(|| args.model.display().to_string()),
                "weights": args.weights,
                "fast_q4_1": !args.candle_q4_1,
                "layers": model.config().layers,
                "projection_bytes": bytes,
                "load_s": t.elapsed().as_secs_f64(),
            }),
        );
        if args.copy_peaks {
            let v = copy_peaks(&model)?;
            if let Some(d2d) = v["d2d_gb_per_s_read_plus_written"]["median"].as_f64() {
                // One step reads every weight once: its bytes at the memory's measured rate
                // (a copy's bytes read plus written).
                let roofline = d2d * 1e9 / bytes as f64;
                out.insert("hbm_roofline_tok_per_s_batch1".into(), json!(roofline));
            }
            out.insert("copy_peaks".into(), v);
        }
        out.insert("decode_kernels".into(), json!(model.decode_kernels()));
        if args.profile {
            out.insert("profile".into(), profile(&model)?);
        }
        if args.check_kernels {
            let (v, pass) = check_kernels(&model)?;
            ok &= pass;
            out.insert("check_kernels".into(), v);
        }
        if !args.no_throughput {
            let on = args.kernels != "off";
            model.set_decode_kernels(on);
            out.insert("throughput".into(), throughput(&args, &model, &stop));
            if args.kernels == "both" {
                model.set_decode_kernels(false);
                out.insert(
                    "throughput_candle_ops".into(),
                    throughput(&args, &model, &stop),
                );
                model.set_decode_kernels(true);
            }
        }
        if args.host_restore {
            out.insert("host_restore".into(), host_restore(&args, &model, &stop));
        }
    }
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    if !ok {
        eprintln!("check failed: see check_cpu / check_kernels in the report");
        std::process::exit(1);
    }
    Ok(())
}
