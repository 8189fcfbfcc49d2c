//! `kvmesh-host`: generates request traces and compares routing plugins on
//! them in simulation, with the same `.wasm` files Envoy runs.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use kvmesh_host_sim::{PluginSpec, SimConfig, simulate};
use kvmesh_host_trace::{
    Arrivals, LongQuestions, TraceRequest, Workload, generate_with, read_jsonl, write_jsonl,
};

#[derive(Parser, Debug)]
#[command(name = "kvmesh-host", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a generated trace as JSONL.
    Generate {
        #[command(flatten)]
        gen_args: GenArgs,
        /// Output file (default: stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Replays a trace through plugins against simulated replicas.
    Simulate(Box<SimulateArgs>),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Kind {
    /// Tenants with shared system prompts.
    SharedSystem,
    /// Multi-turn chat sessions.
    MultiTurn,
    /// Questions over long documents.
    LongDoc,
    /// Unrelated prompts.
    Uncorrelated,
}

#[derive(clap::Args, Debug)]
struct GenArgs {
    /// Workload shape.
    #[arg(long, value_enum, default_value = "shared-system")]
    workload: Kind,
    /// Number of requests.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model name in the bodies.
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// Mean arrival rate, requests per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Tenants, sessions or documents.
    #[arg(long, default_value_t = 8)]
    groups: u32,
    /// Bytes of the shared part (system prompt, document, turn).
    #[arg(long, default_value_t = 4096)]
    shared_bytes: usize,
    /// Bytes of the unique part (question, reply).
    #[arg(long, default_value_t = 256)]
    unique_bytes: usize,
    /// Shared-system workload: fraction of the requests whose question is
    /// long (a pasted document), so most of their prompt is their own.
    #[arg(long, default_value_t = 0.0)]
    long_question_share: f64,
    /// Bytes of each long question.
    #[arg(long, default_value_t = 8000)]
    long_question_bytes: usize,
    /// Turns per multi-turn session.
    #[arg(long, default_value_t = 6)]
    turns: u32,
    /// Popularity of tenants and documents: group k with weight 1/(k+1)^skew
    /// (1: Zipf, 0: uniform).
    #[arg(long, default_value_t = 1.0)]
    skew: f64,
}

impl GenArgs {
    fn generate(&self) -> Vec<TraceRequest> {
        let w = match self.workload {
            Kind::SharedSystem => Workload::SharedSystemPrompts {
                tenants: self.groups,
                skew: self.skew,
                system_bytes: self.shared_bytes,
                question_bytes: self.unique_bytes,
                long_questions: Some(LongQuestions {
                    share: self.long_question_share,
                    bytes: self.long_question_bytes,
                }),
            },
            Kind::MultiTurn => Workload::MultiTurnChat {
                sessions: self.groups,
                turns: self.turns,
                turn_bytes: self.shared_bytes,
                reply_bytes: self.unique_bytes,
            },
            Kind::LongDoc => Workload::LongDocQa {
                documents: self.groups,
                skew: self.skew,
                document_bytes: self.shared_bytes,
                question_bytes: self.unique_bytes,
            },
            Kind::Uncorrelated => Workload::Uncorrelated {
                prompt_bytes: self.shared_bytes,
            },
        };
        let arrivals = Arrivals {
            rate_per_s: self.rate,
            ..Arrivals::default()
        };
        generate_with(&w, self.requests, &self.model, self.seed, &arrivals)
    }
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// JSONL trace to replay; without it one is generated from the
    /// generator flags.
    #[arg(long)]
    trace: Option<PathBuf>,
    #[command(flatten)]
    gen_args: GenArgs,
    /// A plugin to compare: `NAME` (target/plugins/NAME.wasm) or
    /// `NAME=PATH.wasm`; repeat for several.
    #[arg(long = "plugin", required = true)]
    plugins: Vec<String>,
    /// Plugin configuration JSON for all plugins; `{pool}`, `{model}`,
    /// `{chunk_bytes}` and `{strategy}` (the plugin's name) are substituted.
    /// Default: the pool config the control plane pushes.
    #[arg(long)]
    config: Option<String>,
    /// Replicas.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Device-tier capacity per replica, in chunks.
    #[arg(long, default_value_t = 4096)]
    device_chunks: usize,
    /// Host-tier capacity per replica, in chunks.
    #[arg(long, default_value_t = 16384)]
    host_chunks: usize,
    /// Disk-tier capacity per replica, in chunks.
    #[arg(long, default_value_t = 65536)]
    disk_chunks: usize,
    /// Prefill cost per uncached token, microseconds.
    #[arg(long, default_value_t = 100.0)]
    prefill_us: f64,
    /// Fetch cost per token from host memory, microseconds.
    #[arg(long, default_value_t = 10.0)]
    host_fetch_us: f64,
    /// Fetch cost per token from disk, microseconds.
    #[arg(long, default_value_t = 40.0)]
    disk_fetch_us: f64,
    /// Decode cost per output token, microseconds.
    #[arg(long, default_value_t = 20000.0)]
    decode_us: f64,
    /// Interval of replica-state updates to the plugins, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    state_interval_ms: f64,
    /// Worker VMs per plugin sharing one vm_id.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the SVG plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Generate { gen_args, out } => {
            let trace = gen_args.generate();
            match out {
                Some(path) => write_jsonl(BufWriter::new(File::create(&path)?), &trace)?,
                None => write_jsonl(std::io::stdout().lock(), &trace)?,
            }
            Ok(())
        }
        Command::Simulate(args) => run_simulate(&args),
    }
}

fn run_simulate(a: &SimulateArgs) -> Result<()> {
    let trace = match &a.trace {
        Some(path) => read_jsonl(BufReader::new(
            File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
        .with_context(|| format!("reading {}", path.display()))?,
        None => a.gen_args.generate(),
    };
    let cfg = SimConfig {
        replicas: a.replicas,
        capacity_chunks: [a.device_chunks, a.host_chunks, a.disk_chunks],
        prefill_us_per_token: a.prefill_us,
        fetch_us_per_token: [0.0, a.host_fetch_us, a.disk_fetch_us],
        decode_us_per_token: a.decode_us,
        state_interval_ms: a.state_interval_ms,
        workers: a.workers,
        model: trace
            .first()
            .and_then(|r| r.body["model"].as_str())
            .unwrap_or("sim-model")
            .to_owned(),
        ..SimConfig::default()
    };
    let config = match a.config.as_deref() {
        Some(c) => c
            .replace("{pool}", &cfg.pool)
            .replace("{model}", &cfg.model)
            .replace("{chunk_bytes}", &cfg.chunk_bytes.to_string()),
        None => kvmesh_host_sim::default_plugin_config(&cfg.pool, cfg.chunk_bytes),
    };
    let mut plugins = Vec::new();
    for p in &a.plugins {
        let (name, wasm) = match p.split_once('=') {
            Some((name, path)) => (name.to_owned(), PathBuf::from(path)),
            None => (p.clone(), kvmesh_host_runtime::locate_plugin(p)?),
        };
        if !wasm.is_file() {
            bail!("plugin {name}: {} does not exist", wasm.display());
        }
        plugins.push(PluginSpec {
            config: config.replace("{strategy}", &name).into_bytes(),
            name,
            wasm,
        });
    }
    let started = std::time::Instant::now();
    let report = simulate(&trace, &plugins, &cfg)?;
    let mut out = std::io::stdout().lock();
    out.write_all(report.table().as_bytes())?;
    writeln!(out, "simulated in {:.2} s", started.elapsed().as_secs_f64())?;
    if let Some(path) = &a.json {
        std::fs::write(path, report.json())?;
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, report.svg().map_err(anyhow::Error::msg)?)?;
    }
    Ok(())
}
