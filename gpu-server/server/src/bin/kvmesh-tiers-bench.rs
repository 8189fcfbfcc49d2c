//! `kvmesh-tiers-bench`: the KV tiers on a long-context workload, in one run.
//!
//! `--docs` documents of `--doc-tokens` tokens are requested round-robin for `--rounds`
//! rounds (one request at a time, one generated token each, so the time to the first token
//! is the whole request) against three engines over the same model, one after the other:
//! all tiers (device sized for `--device-docs` documents, host for `--host-docs`, the rest
//! on disk, fetch decided by the cost model), device only (same device size), and no
//! caching (the cache is cleared before every request). TTFT p50/p99 are taken over the
//! rounds after the first (the first fills the caches in every configuration).
//!
//! In the same run it measures this machine's memcpy and sequential-read bandwidth (block-
//! sized copies and reads, page cache warm) against the tiers' own block copies and disk
//! reads (the disk tier's read-and-verify path on its own, and as the engine measured it while
//! serving), and prints everything as JSON.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use kvmesh_gpu_server_engine::{
    BlockCopier, CpuCopier, DiskReadProbe, Engine, EngineConfig, EngineHandle, Event, FetchPolicy,
    Request, SamplingParams, Status, TierConfig, evict_page_cache,
};
use kvmesh_gpu_server_model::aligned::AlignedBytes;
use kvmesh_gpu_server_model::{KvPool, Model};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    docs: usize,
    #[arg(long, default_value_t = 3000)]
    doc_tokens: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 2)]
    device_docs: usize,
    #[arg(long, default_value_t = 3)]
    host_docs: usize,
    /// Directory for the disk tier's slabs and the sequential-read file.
    #[arg(long, default_value = "/tmp/kvmesh-tiers-bench")]
    dir: PathBuf,
    /// Which configurations to run (comma separated: tiers, device, none; empty for the
    /// bandwidth figures alone).
    #[arg(long, default_value = "tiers,device,none")]
    configs: String,
}

const BT: usize = 16;

fn doc(i: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|j| ((j * 7919 + i * 104_729 + j * j * 13) % (vocab - 300) + 200) as u32)
        .collect()
}

/// Seconds to the first token of one request, and the tokens served from cache.
fn ttft(e: &EngineHandle, prompt: &[u32]) -> anyhow::Result<(f64, usize)> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    e.submit(Request {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 1,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        chunks: Vec::new(),
        events: tx,
        logits: None,
    })?;
    let mut cached = 0;
    let mut first = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { cached_tokens } => cached = cached_tokens,
            Event::Token(_) => {
                first.get_or_insert(t0.elapsed().as_secs_f64());
            }
            Event::Finished(_) => break,
            Event::Failed(m) => anyhow::bail!("{m}"),
        }
    }
    Ok((first.unwrap_or(f64::NAN), cached))
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tier_json(s: &Status) -> Value {
    let t: Vec<Value> = s
        .tiers
        .iter()
        .filter(|t| t.enabled)
        .map(|t| {
            json!({
                "tier": t.tier,
                "counters": t.counters,
                "bytes": t.bytes,
                "cost": t.cost,
            })
        })
        .collect();
    json!({"tiers": t, "recompute_tokens_per_s": s.cost.recompute_tokens_per_s, "disk": s.disk})
}

fn workload(
    e: &EngineHandle,
    docs: &[Vec<u32>],
    rounds: usize,
    clear: bool,
) -> anyhow::Result<Value> {
    let mut steady = Vec::new();
    let mut first = Vec::new();
    let mut cached = 0usize;
    let mut asked = 0usize;
    for r in 0..rounds {
        for (i, d) in docs.iter().enumerate() {
            if clear {
                e.clear_cache();
            }
            let (t, c) = ttft(e, d)?;
            eprintln!("  round {r} doc {i}: ttft {:.1} ms, cached {c}", t * 1e3);
            if r == 0 {
                first.push(t);
            } else {
                steady.push(t);
                cached += c;
                asked += d.len();
            }
        }
    }
    Ok(json!({
        "ttft_ms_p50": pct(&steady, 50.0) * 1e3,
        "ttft_ms_p99": pct(&steady, 99.0) * 1e3,
        "ttft_ms_min": pct(&steady, 0.0) * 1e3,
        "ttft_ms_max": pct(&steady, 100.0) * 1e3,
        "samples": steady.len(),
        "first_round_ttft_ms_p50": pct(&first, 50.0) * 1e3,
        "cached_token_fraction": cached as f64 / asked.max(1) as f64,
        "status": tier_json(&e.status()),
    }))
}

/// memcpy of block-sized pieces over a buffer far larger than the caches, into a destination
/// `dst_offset` bytes past a page start (the source page-aligned). At offset 0 both are
/// aligned, as the tiers' buffers are: the machine's best case and the baseline. Offset 16 is
/// where glibc's `malloc` puts a large `Vec` (see `AlignedBytes`).
fn memcpy_bw(block: usize, dst_offset: usize) -> f64 {
    let n = (256 << 20) / block;
    let mut src = AlignedBytes::new(n * block);
    src.fill(1);
    let mut dst = AlignedBytes::new(n * block + dst_offset);
    let dst = &mut dst[dst_offset..];
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                for (d, s) in dst.chunks_exact_mut(block).zip(src.chunks_exact(block)) {
                    d.copy_from_slice(s);
                }
                std::hint::black_box(&dst);
                (n * block) as f64 / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// The tiers' copy path (`CpuCopier`, as the engine uses it) between a device pool and a
/// host buffer, both far larger than the caches: (to host, to device) bytes/s.
fn copier_bw(model: &Model) -> (f64, f64) {
    let probe = KvPool::new(model.config(), 1, BT);
    let block = probe.block_bytes_len();
    let n = ((256 << 20) / block).max(8);
    let mut pool = KvPool::new(model.config(), n, BT);
    let mut host = AlignedBytes::new(n * block);
    let mut c = CpuCopier;
    let mut down = Vec::new();
    let mut up = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for (i, h) in host.chunks_exact_mut(block).enumerate() {
            c.to_host(&pool, i as u32, h);
        }
        down.push((n * block) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (i, h) in host.chunks_exact(block).enumerate() {
            c.to_device(h, &mut pool, i as u32);
        }
        up.push((n * block) as f64 / t.elapsed().as_secs_f64());
    }
    (median(down), median(up))
}

/// This machine's sequential read (slot-sized `pread`s over a 256 MiB file into one
/// page-aligned buffer, as `dd` reads) against the disk tier's own read-and-verify path
/// ([`DiskReadProbe`]) over as many bytes, their passes alternating: with the page cache warm
/// (a block demoted moments ago) and cold (pages dropped first, so the reads come from the
/// disk). Medians of the passes after the first.
fn disk_read_bw(dir: &std::path::Path, chunk: usize, payload: usize) -> anyhow::Result<Value> {
    let path = dir.join("seq-read.bin");
    let n = (256 << 20) / chunk;
    std::fs::write(&path, vec![3u8; n * chunk])?;
    let f = std::fs::File::open(&path)?;
    let mut buf = AlignedBytes::new(chunk);
    let probe_dir = dir.join("disk-read");
    let mut probe =
        DiskReadProbe::new(&probe_dir, payload, n * chunk).map_err(anyhow::Error::msg)?;
    let mut out = json!({});
    for (name, cold) in [("page_cache_warm", false), ("page_cache_cold", true)] {
        let (mut seq, mut tier, mut mapped, mut pread) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..4 {
            if cold {
                evict_page_cache(&f)?;
            }
            let t = Instant::now();
            for i in 0..n {
                f.read_exact_at(&mut buf, (i * chunk) as u64)?;
            }
            seq.push((n * chunk) as f64 / t.elapsed().as_secs_f64());
            let (bw, share) = probe.pass(cold, true).map_err(anyhow::Error::msg)?;
            tier.push(bw);
            mapped.push(share);
            // The same reads kept on `pread` (the path before the mapping), side by side.
            pread.push(probe.pass(cold, false).map_err(anyhow::Error::msg)?.0);
        }
        let (s, t) = (median(seq[1..].to_vec()), median(tier[1..].to_vec()));
        let p = median(pread[1..].to_vec());
        out[name] = json!({
            "seq_read_bytes_per_s": s,
            "disk_tier_read_bytes_per_s": t,
            "disk_tier_read_vs_seq_read": t / s,
            // Share of the tier's reads copied out of the mapping (the rest by `pread`).
            "disk_tier_reads_mapped": median(mapped[1..].to_vec()),
            "disk_tier_pread_only_bytes_per_s": p,
            "disk_tier_pread_only_vs_seq_read": p / s,
        });
    }
    drop(probe);
    let _ = std::fs::remove_dir_all(&probe_dir);
    std::fs::remove_file(&path)?;
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = kvmesh_gpu_server_model::load(&args.model)?;
    let cfg = loaded.model.config().clone();
    let stop = loaded.tokenizer.stop_ids.clone();
    let model = Arc::new(loaded.model);
    anyhow::ensure!(
        args.doc_tokens + 2 < cfg.context_length,
        "documents must fit the context ({})",
        cfg.context_length
    );
    let docs: Vec<Vec<u32>> = (0..args.docs)
        .map(|i| doc(i, args.doc_tokens, cfg.vocab_size))
        .collect();
    let doc_blocks = (args.doc_tokens + 1).div_ceil(BT);
    let device_blocks = args.device_docs * doc_blocks + 1;
    let engine_cfg = EngineConfig {
        block_tokens: BT,
        num_blocks: device_blocks,
        step_tokens: 512,
        ..EngineConfig::default()
    };
    std::fs::create_dir_all(&args.dir)?;
    let disk_dir = args.dir.join("slabs");
    let _ = std::fs::remove_dir_all(&disk_dir);
    let mut out = json!({
        "model": args.model.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "docs": args.docs,
        "doc_tokens": args.doc_tokens,
        "rounds": args.rounds,
        "block_tokens": BT,
        "device_blocks": device_blocks,
        "kv_bytes_per_block": cfg.kv_bytes_per_token_f16() * BT,
    });
    let warm = doc(999, 64, cfg.vocab_size);
    for name in args.configs.split(',').filter(|n| !n.is_empty()) {
        let (tiers, clear) = match name {
            "tiers" => (
                TierConfig {
                    host_blocks: args.host_docs * doc_blocks,
                    disk_blocks: args.docs * doc_blocks,
                    disk_dir: Some(disk_dir.clone()),
                    model_tag: 1,
                    fetch: FetchPolicy::CostModel,
                },
                false,
            ),
            "device" => (TierConfig::default(), false),
            "none" => (TierConfig::default(), true),
            other => anyhow::bail!("unknown configuration {other}"),
        };
        eprintln!("{name}:");
        let e = Engine::start_tiered(model.clone(), stop.clone(), engine_cfg, &tiers);
        ttft(&e, &warm)?;
        let r = workload(&e, &docs, args.rounds, clear)?;
        out[name] = r;
        drop(e);
    }
    let block = cfg.kv_bytes_per_token_f16() * BT;
    let (to_host, to_device) = copier_bw(&model);
    let memcpy = memcpy_bw(block, 0);
    let memcpy_off16 = memcpy_bw(block, 16);
    let disk = disk_read_bw(&args.dir, 4096 + block.div_ceil(4096) * 4096, block)?;
    let seq = disk["page_cache_warm"]["seq_read_bytes_per_s"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let disk_read = out["tiers"]["status"]["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["tier"] == "Disk"))
        .and_then(|x| x["cost"]["read_bytes_per_s"].as_f64());
    let host_read = out["tiers"]["status"]["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|x| x["tier"] == "Host"))
        .and_then(|x| x["cost"]["read_bytes_per_s"].as_f64());
    out["bandwidth"] = json!({
        "memcpy_bytes_per_s": memcpy,
        "memcpy_dst_off16_bytes_per_s": memcpy_off16,
        "seq_read_bytes_per_s": seq,
        "copier_device_to_host_bytes_per_s": to_host,
        "copier_host_to_device_bytes_per_s": to_device,
        "copier_to_host_vs_memcpy": to_host / memcpy,
        "copier_to_device_vs_memcpy": to_device / memcpy,
        "engine_host_fetch_bytes_per_s": host_read,
        "engine_host_fetch_vs_memcpy": host_read.map(|b| b / memcpy),
        "disk_read": disk,
        "engine_disk_fetch_bytes_per_s": disk_read,
        "engine_disk_fetch_vs_seq_read": disk_read.map(|b| b / seq),
    });
    if let (Some(t), Some(d)) = (
        out["tiers"]["ttft_ms_p50"].as_f64(),
        out["device"]["ttft_ms_p50"].as_f64(),
    ) {
        out["p50_speedup_tiers_vs_device_only"] = json!(d / t);
    }
    let _ = std::fs::remove_dir_all(&disk_dir);
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
