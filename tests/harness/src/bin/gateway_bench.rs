//! What a routing plugin adds to a request through Envoy.
//!
//! Starts one in-process upstream and one Envoy per configuration (plain
//! Envoy, then each strategy's committed static config), all at once, and
//! sends the same chat request to each in turn, so every configuration sees
//! the same machine noise. Reports client-side latency per configuration and
//! prompt size, the added latency against plain Envoy, and the filter's own
//! decision time (parse + hash + select) from its `decision_us` histogram.
//!
//! `cargo run --release -p kvmesh-tests-harness --bin kvmesh-gateway-bench`
//! (after scripts/build-plugins.sh).

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use kvmesh_tests_harness::{Behaviour, Envoy, StaticGateway, Upstream};

#[derive(Parser, Debug)]
struct Args {
    /// Measured requests per configuration and size.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Warm-up requests per configuration and size.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Prompt sizes in KiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,200")]
    sizes_kib: Vec<usize>,
}

const STRATEGIES: [&str; 3] = ["round-robin", "prefix-aware", "kv-aware"];

fn body(kib: usize) -> Vec<u8> {
    let text: String = (0..kib * 1024)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": "smollm2",
        "max_tokens": 1,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
    }))
    .unwrap_or_default()
}

fn round(v: &str) -> String {
    v.parse::<f64>()
        .map_or_else(|_| v.to_owned(), |x| format!("{x:.0}"))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// P50 and P99 of an Envoy histogram, from the admin's text stats.
async fn histogram(envoy: &Envoy, name: &str) -> Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = reqwest::get(format!("http://{}/stats?filter={name}$", envoy.admin()))
            .await?
            .text()
            .await?;
        let pick = |p: &str| {
            text.split_whitespace()
                .find(|w| w.starts_with(&format!("{p}(")))
                .and_then(|w| w.trim_end_matches(')').split(',').nth(1))
                .map(str::to_owned)
        };
        if let (Some(p50), Some(p99)) = (pick("P50"), pick("P99"))
            && p50 != "nan"
        {
            return Ok((p50, p99));
        }
        if Instant::now() > deadline {
            return Ok(("-".into(), "-".into()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let upstream = Upstream::start("u0", Behaviour::Ok).await?;
    let mut configs: Vec<(String, StaticGateway)> = Vec::new();
    let mut plain = StaticGateway::load("round-robin")?;
    plain.set_upstreams(&[upstream.addr()])?.without_routing()?;
    configs.push(("envoy, no filter".into(), plain));
    for s in STRATEGIES {
        let mut g = StaticGateway::load(s)?;
        g.set_upstreams(&[upstream.addr()])?;
        configs.push((s.into(), g));
    }
    println!(
        "| prompt | configuration | p50 µs | p99 µs | added p50 µs | added p99 µs | decision p50 µs | decision p99 µs |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for &kib in &args.sizes_kib {
        // Fresh Envoys per size, so each decision histogram holds one size.
        let mut running = Vec::new();
        for (name, g) in &configs {
            let envoy = Envoy::start(&g.render()?, 1).await?;
            let url = format!(
                "http://{}/v1/chat/completions",
                envoy.listener("gateway").await?
            );
            running.push((name.clone(), envoy, url));
        }
        // One keep-alive connection per gateway.
        let clients: Vec<reqwest::Client> =
            running.iter().map(|_| reqwest::Client::new()).collect();
        let payload = body(kib);
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(args.requests); running.len()];
        for i in 0..args.warmup + args.requests {
            for (k, (_, _, url)) in running.iter().enumerate() {
                let started = Instant::now();
                let r = clients[k]
                    .post(url)
                    .header("content-type", "application/json")
                    .body(payload.clone())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
                r.bytes().await?;
                if i >= args.warmup {
                    samples[k].push(started.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        for s in &mut samples {
            s.sort_by(f64::total_cmp);
        }
        let (base50, base99) = (quantile(&samples[0], 0.5), quantile(&samples[0], 0.99));
        for (k, (name, envoy, _)) in running.iter().enumerate() {
            let (p50, p99) = (quantile(&samples[k], 0.5), quantile(&samples[k], 0.99));
            let (d50, d99) = if k == 0 {
                ("-".to_owned(), "-".to_owned())
            } else {
                let (a, b) =
                    histogram(envoy, &format!("wasmcustom.kvmesh.{name}.decision_us")).await?;
                (round(&a), round(&b))
            };
            println!(
                "| {kib} KiB | {name} | {p50:.0} | {p99:.0} | {:+.0} | {:+.0} | {d50} | {d99} |",
                p50 - base50,
                p99 - base99
            );
        }
    }
    Ok(())
}
