//! `kvmesh-stack`: runs the whole kvmesh stack on 127.0.0.1 (control plane,
//! model-server replicas reporting to it, Envoy configured by it), shows
//! progress while it comes up, prints the gateway URL and a `curl` to try, and
//! stops everything on Ctrl-C or SIGTERM. `scripts/stack.sh` builds and runs it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use kvmesh_tests_harness::shutdown_signal;
use kvmesh_tests_harness::stack::{Phase, STRATEGIES, Stack, StackConfig};

#[derive(Debug, Parser)]
#[command(name = "kvmesh-stack", version, about)]
struct Cli {
    /// Model-server replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Routing strategy: round-robin, prefix-aware or kv-aware.
    #[arg(long, default_value = "prefix-aware")]
    strategy: String,
    /// Model file (GGUF) or HF directory.
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Model name clients send.
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model_name: String,
    /// Gateway port (0: any free port).
    #[arg(long, default_value_t = 10000)]
    gateway_port: u16,
    /// Log directory (one file per component).
    #[arg(long, default_value = "logs")]
    logs: PathBuf,
    /// KV blocks in each replica's device pool.
    #[arg(long)]
    kv_blocks: Option<u64>,
    /// Device tier bytes per replica (passed to kvmesh-gpu-server).
    #[arg(long)]
    kv_device_bytes: Option<u64>,
    /// Host tier bytes per replica (passed to kvmesh-gpu-server).
    #[arg(long)]
    kv_host_bytes: Option<u64>,
    /// Disk tier bytes per replica (passed to kvmesh-gpu-server).
    #[arg(long)]
    kv_disk_bytes: Option<u64>,
    /// Directory of kvmesh-control-plane and kvmesh-gpu-server (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn bar() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed:>3}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !STRATEGIES.contains(&cli.strategy.as_str()) {
        anyhow::bail!("--strategy must be one of {STRATEGIES:?}");
    }
    let mut cfg = StackConfig::new(cli.replicas, &cli.strategy, &cli.logs);
    cfg.model = std::path::absolute(&cli.model)?;
    cfg.model_name = cli.model_name;
    cfg.gateway_port = cli.gateway_port;
    cfg.warmup_ms = 2000;
    if let Some(d) = cli.bin_dir {
        cfg.bin_dir = d;
    }
    for (flag, v) in [
        ("--kv-blocks", cli.kv_blocks),
        ("--kv-device-bytes", cli.kv_device_bytes),
        ("--kv-host-bytes", cli.kv_host_bytes),
        ("--kv-disk-bytes", cli.kv_disk_bytes),
    ] {
        if let Some(v) = v {
            cfg.replica_args.extend([flag.to_owned(), v.to_string()]);
        }
    }
    let logs = cfg.logs.clone();
    let pb = bar();
    let start = Stack::start_with_progress(cfg, |phase| {
        pb.set_message(match phase {
            Phase::ControlPlane => "starting the control plane".to_owned(),
            Phase::Replicas { n, of } => {
                format!("replicas loading the model and registering: {n}/{of} ready")
            }
            Phase::Envoy => "starting Envoy (config from the control plane)".to_owned(),
            Phase::Gateway => "waiting for the replicas in EDS and a first answer".to_owned(),
        })
    });
    // Ctrl-C during start-up drops the half-started stack (killing what ran).
    let stack = tokio::select! {
        s = start => s,
        () = shutdown_signal() => {
            pb.finish_with_message("interrupted; stopped");
            return Ok(());
        }
    };
    let mut stack = match stack {
        Ok(s) => s,
        Err(e) => {
            pb.finish_and_clear();
            anyhow::bail!("{e:#}\n(logs in {})", logs.display());
        }
    };
    pb.finish_and_clear();
    let url = stack.gateway_url();
    let c = stack.config();
    println!(
        "kvmesh is up: gateway {url} ({} over {} replicas)\n\
         control plane admin {} (token in KVMESH_ADMIN_TOKEN: {}), Envoy admin http://{}\n\
         logs: {}\n\
         Try:\n  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
         -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}],\"max_tokens\":32}}'\n\
         Ctrl-C stops everything.",
        c.strategy,
        c.replicas,
        stack.control_plane_url(),
        stack.admin_token(),
        stack.envoy_admin(),
        c.logs.display(),
        c.model_name,
    );
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {
                let dead = stack.exited();
                if !dead.is_empty() {
                    stack.stop();
                    anyhow::bail!("{} exited; stopped the rest (logs in {})", dead.join(", "), logs.display());
                }
            }
        }
    }
    stack.stop();
    eprintln!("stopped; logs in {}", logs.display());
    Ok(())
}
