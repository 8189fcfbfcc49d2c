//! End-to-end state propagation benchmark: replica state change -> visible in
//! every Envoy worker.
//!
//! Runs the real control-plane binary, Envoy (bootstrap-dynamic.yaml with the
//! state pump) with the diagnostic state probe in the pool's listener, and N
//! in-process fake replicas (Reporters) holding `--chunks` resident chunks
//! each. Each sample changes one replica's load (a marker value) and polls the
//! probe on a connection per Envoy worker until every worker reports it.
//!
//! ```sh
//! scripts/build-plugins.sh
//! cargo build --release -p kvmesh-control-plane-server
//! cargo run --release -p kvmesh-control-plane-server --example state_bench -- --replicas 8,64,256
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kvmesh_plugins_sdk::proto::{Load, Tier, TierChunks};
use tokio::time::Instant;

struct Args {
    replicas: Vec<usize>,
    chunks: u64,
    samples: usize,
    rss_replicas: usize,
}

fn args() -> Args {
    let mut a = Args {
        replicas: vec![8, 64, 256],
        chunks: 10_000,
        samples: 50,
        rss_replicas: 1000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for w in argv.chunks(2) {
        match (w[0].as_str(), w.get(1)) {
            ("--replicas", Some(v)) => {
                a.replicas = v.split(',').filter_map(|x| x.parse().ok()).collect()
            }
            ("--chunks", Some(v)) => a.chunks = v.parse().unwrap_or(a.chunks),
            ("--samples", Some(v)) => a.samples = v.parse().unwrap_or(a.samples),
            ("--rss-replicas", Some(v)) => a.rss_replicas = v.parse().unwrap_or(a.rss_replicas),
            _ => {}
        }
    }
    a
}

/// One HTTP client per Envoy worker (each keeps one connection, which Envoy
/// pins to a worker), found by asking the probe which VM answered.
async fn worker_clients(listener: u16, workers: usize) -> Vec<reqwest::Client> {
    let mut by_vm: BTreeMap<String, reqwest::Client> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while by_vm.len() < workers {
        assert!(
            Instant::now() < deadline,
            "could not reach {workers} workers"
        );
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        if let Ok(r) = c
            .get(format!("http://127.0.0.1:{listener}/kvmesh/state/pool-a"))
            .send()
            .await
            && let Some(vm) = r
                .headers()
                .get("x-kvmesh-vm")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        {
            by_vm.entry(vm).or_insert(c);
        }
    }
    by_vm.into_values().collect()
}

async fn probe(c: &reqwest::Client, listener: u16) -> serde_json::Value {
    match c
        .get(format!("http://127.0.0.1:{listener}/kvmesh/state/pool-a"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

fn waiting_of(view: &serde_json::Value, id: &str) -> Option<u64> {
    view["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)?["waiting"]
        .as_u64()
}

fn proc_stat(pid: u32) -> (f64, u64) {
    // (utime+stime seconds, RSS bytes)
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss_kb * 1024)
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let Some(bin) = envoy_bin("state_bench") else {
        return;
    };
    let (Some(pump), Some(probe_wasm)) = (
        plugin("state_bench", "state-pump"),
        plugin("state_bench", "state-probe"),
    ) else {
        return;
    };
    println!(
        "| replicas | chunks/replica | samples | p50 ms | p99 ms | max ms | kvmesh xDS bytes/s | CP CPU % | CP RSS MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &n in &args.replicas {
        run(&bin, &pump, &probe_wasm, n, args.chunks, args.samples, true).await;
    }
    if args.rss_replicas > 0 {
        run(
            &bin,
            &pump,
            &probe_wasm,
            args.rss_replicas,
            args.chunks,
            0,
            false,
        )
        .await;
    }
}

async fn run(
    bin: &std::path::Path,
    pump: &std::path::Path,
    probe_wasm: &std::path::Path,
    n: usize,
    chunks: u64,
    samples: usize,
    with_envoy: bool,
) {
    let dir = tempdir("bench");
    let listener = free_port();
    let extra = "warmup_ms: 0\nreplica_silence_ms: 30000\n";
    let probe_line = format!("    probe_module: {}\n", probe_wasm.display());
    let cp = ControlPlane::start(
        &dir,
        &cp_yaml(0, listener, &dir.join("store"), extra, &probe_line),
    );
    let envoy = with_envoy.then(|| Envoy::start(bin, &dir, cp.grpc, Some(pump)));
    let backends_port_base = 30000u16;
    let mut reporters = Vec::new();
    for i in 0..n {
        let addr = format!("127.0.0.1:{}", backends_port_base + i as u16)
            .parse()
            .expect("addr");
        let b = Backend::fake(&format!("r{i}"), addr);
        let r = b.reporter(cp.grpc);
        let base = (i as u64) << 40;
        r.residency(
            vec![TierChunks {
                tier: Tier::Device as i32,
                chunks: (0..chunks).map(|c| base + c).collect(),
            }],
            vec![],
        );
        reporters.push(r);
    }
    let registered = Instant::now();
    eventually(
        "all replicas registered",
        Duration::from_secs(300),
        || async { (cp.replicas().await.len() == n).then_some(()) },
    )
    .await;
    let pid = cp.pid();
    let mut row_latency = (f64::NAN, f64::NAN, f64::NAN);
    let mut bytes_per_s = f64::NAN;
    let (mut cpu0, _) = proc_stat(pid);
    let mut t0 = Instant::now();
    if let Some(_envoy) = &envoy {
        let workers = worker_clients(listener, 2).await;
        // Samples measure the steady state: every worker holds every
        // replica and all of their chunks (distinct per replica) first.
        eventually(
            "every worker sees all replicas and chunks",
            Duration::from_secs(300),
            || async {
                for w in &workers {
                    let view = probe(w, listener).await;
                    let members = view["replicas"].as_array().map_or(0, Vec::len);
                    let indexed = view["indexed_chunks"].as_u64().unwrap_or(0);
                    if members != n || indexed != n as u64 * chunks {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        eprintln!(
            "{n} replicas and {} chunks visible in every worker {:.1}s after registration",
            n as u64 * chunks,
            registered.elapsed().as_secs_f64()
        );
        // Bytes and CPU over the samples only (the initial sync excluded).
        (cpu0, t0) = (proc_stat(pid).0, Instant::now());
        let bytes0 = metric(
            &cp.metrics().await,
            "kvmesh_cp_xds_push_bytes_total{type_url=\"type.googleapis.com/kvmesh.v1",
        );
        let mut lat = Vec::new();
        let mut gap: u64 = 0x9e37_79b9_7f4a_7c15;
        for s in 0..samples {
            let i = s * 7919 % n;
            let marker = 1_000 + s as u32;
            let start = Instant::now();
            reporters[i].load(Load {
                waiting: marker,
                ..Default::default()
            });
            let id = format!("r{i}");
            loop {
                let mut all = true;
                for w in &workers {
                    if waiting_of(&probe(w, listener).await, &id) != Some(u64::from(marker)) {
                        all = false;
                        break;
                    }
                }
                if all {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "sample {s} never became visible"
                );
            }
            lat.push(start.elapsed().as_secs_f64() * 1000.0);
            // A pseudo-random gap (20-69 ms), so a change lands at any phase
            // of the publish interval and the pump's flush window: a fixed
            // gap locks onto those periods and skews the distribution.
            gap = gap ^ (gap << 13);
            gap ^= gap >> 7;
            gap ^= gap << 17;
            tokio::time::sleep(Duration::from_millis(20 + gap % 50)).await;
        }
        lat.sort_by(f64::total_cmp);
        row_latency = (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            *lat.last().unwrap_or(&f64::NAN),
        );
        let bytes1 = metric(
            &cp.metrics().await,
            "kvmesh_cp_xds_push_bytes_total{type_url=\"type.googleapis.com/kvmesh.v1",
        );
        bytes_per_s = (bytes1 - bytes0) / t0.elapsed().as_secs_f64();
    } else {
        // No Envoy: control-plane cost of holding and aggregating n replicas
        // with every replica's load changing each 100 ms.
        let until = Instant::now() + Duration::from_secs(10);
        let mut k = 0u32;
        while Instant::now() < until {
            for r in &reporters {
                r.load(Load {
                    waiting: k,
                    ..Default::default()
                });
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (cpu1, rss) = proc_stat(pid);
    let cpu_pct = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    println!(
        "| {n} | {chunks} | {samples} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} |",
        row_latency.0,
        row_latency.1,
        row_latency.2,
        bytes_per_s,
        cpu_pct,
        rss as f64 / (1 << 20) as f64
    );
    drop(envoy);
}
