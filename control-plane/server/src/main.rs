//! `kvmesh-control-plane`: runs the control plane (`serve`) or talks to a
//! running one through its admin API (`pools`, `replicas`, `set-strategy`,
//! `rollback`), or plays fake replicas (`fake-replicas`) for benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kvmesh_control_plane_api::{Reporter, ReporterConfig};
use kvmesh_control_plane_server::config::{Config, StrategySpec};
use kvmesh_plugins_sdk::proto::{Load, Register, Tier, TierChunks};

#[derive(Debug, Parser)]
#[command(name = "kvmesh-control-plane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "KVMESH_ADMIN_URL",
        default_value = "http://127.0.0.1:18001"
    )]
    admin: String,
    /// Bearer token for changes.
    #[arg(long, env = "KVMESH_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List pools with their strategy and per-Envoy filter state.
    Pools(AdminArgs),
    /// List replicas with their live state.
    Replicas(AdminArgs),
    /// Set a pool's routing strategy; waits for Envoy's ACK or NACK.
    SetStrategy {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        pool: String,
        /// Strategy name (round-robin, prefix-aware, kv-aware, ...).
        #[arg(long)]
        name: String,
        /// Module: a path (made absolute here) or an http:// URL.
        #[arg(long)]
        module: String,
        /// Expected sha256 of the module.
        #[arg(long)]
        sha256: Option<String>,
        /// Strategy parameters, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
    },
    /// Restore a pool's previous strategy.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        pool: String,
    },
    /// Register N fake replicas that report load and residency churn.
    FakeReplicas {
        /// ReplicaState endpoint.
        #[arg(long, default_value = "http://127.0.0.1:18000")]
        endpoint: String,
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 8)]
        count: u32,
        /// Resident chunks per replica.
        #[arg(long, default_value_t = 10_000)]
        chunks: u64,
        /// Chunks replaced per replica per second.
        #[arg(long, default_value_t = 100)]
        churn: u64,
        /// First serving port; replica i reports 127.0.0.1:(base_port + i).
        #[arg(long, default_value_t = 20000)]
        base_port: u16,
    },
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?)
}

async fn show(resp: reqwest::Response) -> anyhow::Result<()> {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("admin API answered non-JSON")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    match status.as_u16() {
        200 => Ok(()),
        202 => bail!("not every Envoy answered in time (pending)"),
        409 if body.get("result").is_some() => {
            bail!("NACKed by Envoy: the previous strategy keeps serving")
        }
        _ => bail!("admin API answered {status}"),
    }
}

fn bearer(req: reqwest::RequestBuilder, token: &Option<String>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

async fn fake_replicas(
    endpoint: String,
    model: String,
    count: u32,
    chunks: u64,
    churn: u64,
    base_port: u16,
) -> anyhow::Result<()> {
    let mut reporters = Vec::new();
    for i in 0..count {
        let register = Register {
            replica_id: format!("fake-{i}"),
            address: format!("127.0.0.1:{}", base_port.wrapping_add(i as u16)),
            model: model.clone(),
            block_tokens: 16,
            chunk_bytes: 0,
            capacity: vec![],
        };
        let r = Reporter::spawn(ReporterConfig::new(endpoint.clone(), register));
        let base = u64::from(i) << 40;
        r.residency(
            vec![TierChunks {
                tier: Tier::Device as i32,
                chunks: (0..chunks).map(|c| base + c).collect(),
            }],
            vec![],
        );
        reporters.push((r, base));
    }
    eprintln!("{count} fake replicas reporting to {endpoint}; ctrl-c to stop");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next = chunks;
    let per_tick = (churn / 10).max(1);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        for (r, base) in &reporters {
            let added: Vec<u64> = (next..next + per_tick).map(|c| base + c).collect();
            let removed: Vec<u64> = (next - chunks..next - chunks + per_tick)
                .map(|c| base + c)
                .collect();
            r.residency(
                vec![TierChunks {
                    tier: Tier::Device as i32,
                    chunks: added,
                }],
                vec![TierChunks {
                    tier: Tier::Device as i32,
                    chunks: removed,
                }],
            );
            r.load(Load {
                waiting: (next % 7) as u32,
                running: 4,
                queued_prefill_tokens: next % 1000,
                kv: vec![],
            });
        }
        next += per_tick;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            kvmesh_control_plane_server::serve(config, |b| {
                // Tests and scripts read this line to learn the bound ports.
                println!(
                    "kvmesh-control-plane listening grpc={} admin={}",
                    b.grpc, b.admin
                );
            })
            .await
        }
        Command::Pools(a) => {
            show(
                client()?
                    .get(format!("{}/v1/pools", a.admin))
                    .send()
                    .await?,
            )
            .await
        }
        Command::Replicas(a) => {
            show(
                client()?
                    .get(format!("{}/v1/replicas", a.admin))
                    .send()
                    .await?,
            )
            .await
        }
        Command::SetStrategy {
            admin,
            pool,
            name,
            module,
            sha256,
            params,
        } => {
            let module = if module.starts_with("http://") || module.starts_with("https://") {
                module
            } else {
                std::path::absolute(&module)?.to_string_lossy().into_owned()
            };
            let params: serde_json::Value =
                serde_json::from_str(&params).context("--params is not JSON")?;
            let spec = StrategySpec {
                name,
                module,
                sha256,
                params,
            };
            let req = client()?
                .put(format!("{}/v1/pools/{pool}/strategy", admin.admin))
                .json(&spec);
            show(bearer(req, &admin.token).send().await?).await
        }
        Command::Rollback { admin, pool } => {
            let req = client()?.post(format!("{}/v1/pools/{pool}/rollback", admin.admin));
            show(bearer(req, &admin.token).send().await?).await
        }
        Command::FakeReplicas {
            endpoint,
            model,
            count,
            chunks,
            churn,
            base_port,
        } => fake_replicas(endpoint, model, count, chunks, churn, base_port).await,
    }
}
