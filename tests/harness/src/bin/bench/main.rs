//! `kvmesh-bench`: drives the whole stack through the OpenAI API with a
//! generated trace (`kvmesh-host-trace`), once per routing strategy (swapped
//! through the control plane) and once through the SGLang router
//! (`cache_aware`) in front of the very same replicas, with cold caches
//! before each run; writes a markdown table and an SVG plot.

mod report;
mod sglang;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kvmesh_host_trace::{Arrivals, LongQuestions, TraceRequest, Workload, generate_with};
use kvmesh_tests_harness::load::{Outcome, send};
use kvmesh_tests_harness::stack::{Stack, StackConfig};
use serde_json::Value;

use crate::report::{CacheUse, Run, Summary};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadKind {
    /// Tenants with long shared system prompts (Zipf popularity).
    SharedSystem,
    /// Multi-turn chat sessions.
    MultiTurn,
    /// Questions over long documents.
    LongDoc,
    /// Unrelated prompts.
    Uncorrelated,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// C clients, each sends its next request when the previous one ended.
    Closed,
    /// Requests sent at the trace's Poisson arrival times.
    Open,
}

#[derive(Debug, Parser)]
#[command(name = "kvmesh-bench", version, about)]
struct Cli {
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// kvmesh strategies to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round-robin,prefix-aware,kv-aware"
    )]
    strategies: Vec<String>,
    /// Python with `sglang-router` installed; the peer run is left out without it.
    #[arg(long)]
    sglang_python: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "shared-system")]
    workload: WorkloadKind,
    #[arg(long, default_value_t = 120)]
    requests: usize,
    /// Tenants, sessions or documents.
    #[arg(long, default_value_t = 16)]
    groups: u32,
    /// Bytes of the shared part (system prompt, document, turn).
    #[arg(long, default_value_t = 3000)]
    shared_bytes: usize,
    /// Bytes of the unique part (question).
    #[arg(long, default_value_t = 200)]
    unique_bytes: usize,
    /// Shared-system workload: fraction of the requests whose question is
    /// long (a pasted document), so most of their prompt is their own.
    #[arg(long, default_value_t = 0.0)]
    long_question_share: f64,
    /// Bytes of each long question.
    #[arg(long, default_value_t = 8000)]
    long_question_bytes: usize,
    /// Popularity of tenants and documents: group k with weight 1/(k+1)^skew
    /// (1: Zipf; 0: uniform, the shape of SGLang's generated-shared-prefix benchmark).
    #[arg(long, default_value_t = 1.0)]
    skew: f64,
    #[arg(long, value_enum, default_value = "closed")]
    mode: Mode,
    /// Closed loop: concurrent clients.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Open loop: mean arrival rate, requests/s.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Output tokens per request, drawn from LO,HI.
    #[arg(long, value_delimiter = ',', default_values_t = [16u32, 32])]
    output_tokens: Vec<u32>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// KV blocks per replica (16 tokens each) during the runs.
    #[arg(long, default_value_t = 256)]
    kv_blocks: u64,
    /// KV blocks of the oracle replica (large enough never to evict).
    #[arg(long, default_value_t = 4096)]
    oracle_kv_blocks: u64,
    /// Extra flags for every replica.
    #[arg(long, allow_hyphen_values = true)]
    replica_arg: Vec<String>,
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value = "logs/bench")]
    logs: PathBuf,
    /// Markdown file whose `## whole stack` results block is replaced.
    #[arg(long)]
    md: Option<PathBuf>,
    #[arg(long)]
    svg: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn workload(cli: &Cli) -> Workload {
    match cli.workload {
        WorkloadKind::SharedSystem => Workload::SharedSystemPrompts {
            tenants: cli.groups,
            skew: cli.skew,
            system_bytes: cli.shared_bytes,
            question_bytes: cli.unique_bytes,
            long_questions: Some(LongQuestions {
                share: cli.long_question_share,
                bytes: cli.long_question_bytes,
            }),
        },
        WorkloadKind::MultiTurn => Workload::MultiTurnChat {
            sessions: cli.groups,
            turns: 6,
            turn_bytes: cli.unique_bytes,
            reply_bytes: cli.shared_bytes / 6,
        },
        WorkloadKind::LongDoc => Workload::LongDocQa {
            documents: cli.groups,
            skew: cli.skew,
            document_bytes: cli.shared_bytes,
            question_bytes: cli.unique_bytes,
        },
        WorkloadKind::Uncorrelated => Workload::Uncorrelated {
            prompt_bytes: cli.shared_bytes + cli.unique_bytes,
        },
    }
}

/// Greedy decoding, so every target generates the same tokens.
fn body(r: &TraceRequest) -> Value {
    let mut b = r.body.clone();
    b["temperature"] = Value::from(0.0);
    b
}

/// The oracle: infinite cache and perfect routing, measured on the real
/// server: one replica with a cache that never evicts serves the whole trace
/// in order, so each request reuses the longest block-aligned prefix of any
/// earlier one. Its count of requests with nothing cached is the fewest any
/// router can reach.
async fn oracle(
    stack: &mut Stack,
    trace: &[TraceRequest],
    blocks: u64,
) -> anyhow::Result<CacheUse> {
    let args = stack.config().replica_args.clone();
    let mut cleaned = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--kv-blocks" {
            skip = true;
            continue;
        }
        cleaned.push(a);
    }
    cleaned.extend(["--kv-blocks".to_owned(), blocks.to_string()]);
    stack.restart_replica_with(0, Some(cleaned)).await?;
    let addr = stack.replica_addrs()[0];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let mut served = Vec::with_capacity(trace.len());
    let start = Instant::now();
    for r in trace {
        let mut b = body(r);
        b["max_tokens"] = Value::from(1);
        let o = send(&client, &format!("http://{addr}"), &r.path, b, false, start).await;
        anyhow::ensure!(o.ok, "oracle request failed: {:?}", o.error);
        served.push(o);
    }
    stack.restart_replica_with(0, None).await?;
    Ok(CacheUse::of(&served))
}

/// Samples each replica's `kvmesh_queued_prefill_tokens` every 100 ms.
fn sample_queues(
    addrs: Vec<std::net::SocketAddr>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Vec<f64>>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut samples = vec![Vec::new(); addrs.len()];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            for (i, a) in addrs.iter().enumerate() {
                if let Some(v) = metric(&client, *a, "kvmesh_queued_prefill_tokens").await {
                    samples[i].push(v);
                }
            }
        }
        samples
    })
}

/// One metric from a replica's `/metrics` (first sample of that name).
async fn metric(client: &reqwest::Client, addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix("_total").unwrap_or(rest);
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Sends the trace to `base` and measures.
async fn drive(cli: &Cli, base: &str, trace: &[TraceRequest]) -> (Vec<Outcome>, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_default();
    let start = Instant::now();
    let trace: Arc<Vec<TraceRequest>> = Arc::new(trace.to_vec());
    let mut tasks = Vec::new();
    match cli.mode {
        Mode::Closed => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..cli.concurrency.max(1) {
                let (client, trace, next, base) =
                    (client.clone(), trace.clone(), next.clone(), base.to_owned());
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = trace.get(i) else { break };
                        out.push((i, send(&client, &base, &r.path, body(r), true, start).await));
                    }
                    out
                }));
            }
        }
        Mode::Open => {
            for (i, r) in trace.iter().enumerate() {
                let (client, r, base) = (client.clone(), r.clone(), base.to_owned());
                tasks.push(tokio::spawn(async move {
                    let at = start + Duration::from_secs_f64(r.at_ms / 1000.0);
                    tokio::time::sleep_until(at.into()).await;
                    vec![(
                        i,
                        send(&client, &base, &r.path, body(&r), true, start).await,
                    )]
                }));
            }
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_by_key(|(i, _)| *i);
    (all.into_iter().map(|(_, o)| o).collect(), start.elapsed())
}

async fn run_target(
    cli: &Cli,
    stack: &Stack,
    name: &str,
    base: &str,
    trace: &[TraceRequest],
) -> anyhow::Result<Run> {
    eprintln!("==> {name}: {} requests", trace.len());
    let addrs = stack.replica_addrs();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_queues(addrs.clone(), stop.clone());
    let (outcomes, wall) = drive(cli, base, trace).await;
    stop.store(true, Ordering::Relaxed);
    let queues = sampler.await.unwrap_or_default();
    let client = reqwest::Client::new();
    let mut prefill = Vec::new();
    for a in &addrs {
        let p = metric(&client, *a, "kvmesh_prompt_tokens")
            .await
            .unwrap_or(0.0);
        let c = metric(&client, *a, "kvmesh_cached_prompt_tokens")
            .await
            .unwrap_or(0.0);
        prefill.push(p - c);
    }
    let run = Run {
        name: name.to_owned(),
        outcomes,
        wall,
        queues,
        prefill,
    };
    eprintln!("    {}", Summary::of(&run, 1.0).line());
    Ok(run)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // On Ctrl-C or SIGTERM the bench's future is dropped, and with it the stack and the
    // SGLang router, whose drops stop their processes: nothing is left running.
    tokio::select! {
        r = bench(cli) => r,
        () = kvmesh_tests_harness::shutdown_signal() => {
            anyhow::bail!("interrupted; the stack is stopped and nothing was written")
        }
    }
}

async fn bench(cli: Cli) -> anyhow::Result<()> {
    let (lo, hi) = match cli.output_tokens.as_slice() {
        [a] => (*a, *a),
        [a, b, ..] => (*a, *b),
        [] => (16, 32),
    };
    let mut cfg = StackConfig::new(cli.replicas, &cli.strategies[0], &cli.logs);
    cfg.model = std::path::absolute(&cli.model)?;
    cfg.replica_args = vec!["--kv-blocks".to_owned(), cli.kv_blocks.to_string()];
    cfg.replica_args.extend(cli.replica_arg.iter().cloned());
    cfg.envoy_concurrency = 2;
    let model_name = cfg.model_name.clone();
    eprintln!(
        "==> starting the stack ({} replicas; logs in {})",
        cli.replicas,
        cli.logs.display()
    );
    let mut stack = Stack::start(cfg).await?;

    let trace = generate_with(
        &workload(&cli),
        cli.requests,
        &model_name,
        cli.seed,
        &Arrivals {
            rate_per_s: cli.rate,
            output_tokens: (lo, hi),
        },
    );
    eprintln!(
        "==> oracle: the trace in order on one replica with {} KV blocks",
        cli.oracle_kv_blocks
    );
    let oracle = oracle(&mut stack, &trace, cli.oracle_kv_blocks).await?;
    eprintln!(
        "    oracle cached-token ratio {:.3}, {} requests with nothing cached",
        oracle.ratio, oracle.uncached
    );

    let mut runs = Vec::new();
    for s in &cli.strategies {
        stack.restart_replicas().await?;
        stack
            .set_strategy(s, Value::Object(Default::default()))
            .await
            .with_context(|| format!("swap to {s}"))?;
        let base = stack.gateway_url();
        runs.push(run_target(&cli, &stack, &format!("kvmesh {s}"), &base, &trace).await?);
    }
    if let Some(py) = &cli.sglang_python {
        stack.restart_replicas().await?;
        let router = sglang::Router::start(py, &stack.replica_addrs(), stack.logs()).await?;
        runs.push(run_target(&cli, &stack, "sglang cache_aware", &router.url(), &trace).await?);
    }
    stack.stop();

    let summaries: Vec<Summary> = runs.iter().map(|r| Summary::of(r, oracle.ratio)).collect();
    let setup = report::Setup {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        replicas: cli.replicas,
        requests: cli.requests,
        workload: format!("{:?}", workload(&cli)),
        mode: match cli.mode {
            Mode::Closed => format!("closed loop, {} clients", cli.concurrency),
            Mode::Open => format!("open loop, {} req/s Poisson", cli.rate),
        },
        output_tokens: (lo, hi),
        kv_blocks: cli.kv_blocks,
        oracle,
    };
    let table = report::markdown(&setup, &summaries);
    println!("{table}");
    if let Some(p) = &cli.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&report::json(
                &setup,
                &summaries,
                &runs,
                &trace.iter().map(|r| r.tag.clone()).collect::<Vec<_>>(),
            ))?,
        )?;
    }
    if let Some(p) = &cli.svg {
        std::fs::write(p, report::svg(&summaries, oracle.ratio)?)?;
    }
    if let Some(p) = &cli.md {
        report::splice(p, &table)?;
    }
    Ok(())
}
