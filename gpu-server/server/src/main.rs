//! `kvmesh-gpu-server`: serves a model over the OpenAI API; `gen-tiny` writes a random-weight
//! model, tiny for tests or of a real shape (`--shape llama-3.1-8b`) for throughput benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::quantized::GgmlDType;
use clap::{Parser, Subcommand};
use kvmesh_gpu_server_engine::{EngineConfig, FetchPolicy};
use kvmesh_gpu_server_model::LoadOptions;
use kvmesh_gpu_server_model::tiny::{self, TinySpec};
use kvmesh_gpu_server_server::reporter::{ReportTarget, StateReporter};
use kvmesh_gpu_server_server::{AppState, KvTiers, ServerConfig, serve_as};

#[derive(Parser, Debug)]
#[command(name = "kvmesh-gpu-server", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// A .gguf file or an HF directory (config.json, tokenizer.json, *.safetensors).
    #[arg(
        long,
        alias = "model-path",
        env = "KVMESH_MODEL_PATH",
        default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// The model name clients send; also seeds the text-chunk hashes and picks the
    /// control plane's pool.
    #[arg(
        long,
        env = "KVMESH_MODEL_NAME",
        default_value = "SmolLM2-135M-Instruct"
    )]
    model_name: String,
    #[arg(long, env = "KVMESH_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Overrides the port of `--listen` (0: any free port).
    #[arg(long, env = "KVMESH_PORT")]
    port: Option<u16>,
    /// Control plane `ReplicaState` endpoint (e.g. `http://127.0.0.1:18000`); when set, the
    /// server registers and streams its load and KV residency there.
    #[arg(long, env = "KVMESH_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Replica id reported to the control plane and sent in every response's
    /// `x-kvmesh-replica` header (default: the advertised address).
    #[arg(long, env = "KVMESH_REPLICA_ID")]
    replica_id: Option<String>,
    /// `host:port` the gateway sends requests to (default: the bound address).
    #[arg(long, env = "KVMESH_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_tokens: usize,
    /// KV blocks in the device pool (`--kv-device-bytes` wins when both are given).
    #[arg(long, default_value_t = 1024)]
    kv_blocks: usize,
    /// Device KV tier in bytes (must not be 0).
    #[arg(long, env = "KVMESH_KV_DEVICE_BYTES")]
    kv_device_bytes: Option<u64>,
    /// Host (DRAM) KV tier in bytes; 0 = off; default 512 MiB.
    #[arg(long, env = "KVMESH_KV_HOST_BYTES")]
    kv_host_bytes: Option<u64>,
    /// Disk KV tier in bytes; 0 = off; default 2 GiB when a directory is given.
    #[arg(long, env = "KVMESH_KV_DISK_BYTES")]
    kv_disk_bytes: Option<u64>,
    /// Directory of the disk tier's slab files (the tier is off without one).
    #[arg(long, env = "KVMESH_KV_DISK_DIR")]
    kv_disk_dir: Option<PathBuf>,
    /// Fetch cached blocks from HOST/DISK when the measured cost model says it beats
    /// recomputing (`cost`), or always (`always`).
    #[arg(long, default_value = "cost", value_parser = ["cost", "always"])]
    kv_fetch: String,
    /// Tokens per engine step (decode plus prefill chunks). Default: 128 on the CPU, where
    /// smaller chunks prefill faster (the demo model took 15.3 s for a 3,464-token prompt
    /// at 128 against 21.4 s at 512) and a short request that arrives during a long prefill
    /// waits for a shorter chunk; 512 on a GPU.
    #[arg(long)]
    step_tokens: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_running: usize,
    /// Waiting requests beyond which new ones get 429.
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// Text chunk size of the residency reports (must match the routing pool's).
    #[arg(long, default_value_t = 256)]
    chunk_bytes: u32,
    /// Completion length when a request sets none.
    #[arg(long, default_value_t = 256)]
    max_tokens_default: usize,
    /// Compute device of the model and its KV pool: `cpu`, or `cuda` / `cuda:N` in a build
    /// with the `cuda` feature.
    #[arg(long, env = "KVMESH_DEVICE", default_value = "cpu")]
    device: String,
    /// Type of the projection weights: `native` keeps the file's (quantized stays quantized);
    /// `f16` or `f32` dequantizes at load.
    #[arg(long, default_value = "native", value_parser = ["native", "f16", "f32"])]
    weights: String,
}

/// `--weights` as the model loader takes it.
fn weights_dtype(name: &str) -> Option<candle_core::DType> {
    match name {
        "f16" => Some(candle_core::DType::F16),
        "f32" => Some(candle_core::DType::F32),
        _ => None,
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Writes a random-weight Llama model as GGUF (and optionally as safetensors): tiny by
    /// default, or a real shape to measure throughput without downloading weights.
    #[command(alias = "gen-model")]
    GenTiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        safetensors_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// `tiny`, `smollm2-135m` or `llama-3.1-8b` (32 layers, 8 KV heads, head dim 128).
        #[arg(long, default_value = "tiny", value_parser = TinySpec::SHAPES)]
        shape: String,
        /// Type of the projection weights: f32, f16, q8_0, q4_0 or q4_1.
        #[arg(long, default_value = "q8_0", value_parser = ["f32", "f16", "q8_0", "q4_0", "q4_1"])]
        dtype: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Cmd::GenTiny {
        out,
        safetensors_dir,
        seed,
        shape,
        dtype,
    }) = cli.cmd
    {
        let dtype = match dtype.as_str() {
            "f32" => GgmlDType::F32,
            "f16" => GgmlDType::F16,
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            _ => GgmlDType::Q8_0,
        };
        let spec = TinySpec::shape(&shape, dtype, seed).context("unknown shape")?;
        tiny::write_gguf(&out, &spec)?;
        if let Some(dir) = safetensors_dir {
            tiny::write_safetensors_dir(&dir, &spec)?;
        }
        return Ok(());
    }
    let cfg = ServerConfig {
        model_name: cli.model_name,
        chunk_bytes: cli.chunk_bytes,
        max_tokens_default: cli.max_tokens_default,
        engine: EngineConfig {
            block_tokens: cli.block_tokens,
            num_blocks: cli.kv_blocks,
            step_tokens: cli
                .step_tokens
                .unwrap_or(if cli.device == "cpu" { 128 } else { 512 }),
            max_running: cli.max_running,
            max_waiting: cli.max_waiting,
        },
        kv: KvTiers {
            device_bytes: cli.kv_device_bytes,
            host_bytes: cli.kv_host_bytes,
            disk_bytes: cli.kv_disk_bytes,
            disk_dir: cli.kv_disk_dir,
            fetch: if cli.kv_fetch == "always" {
                FetchPolicy::Always
            } else {
                FetchPolicy::CostModel
            },
        },
    };
    let opts = LoadOptions {
        device: kvmesh_gpu_server_model::device(&cli.device)?,
        weights: weights_dtype(&cli.weights),
        ..LoadOptions::default()
    };
    let state = AppState::load_with(&cli.model, &cfg, opts)
        .with_context(|| format!("loading {}", cli.model.display()))?;
    let mut listen = cli.listen;
    if let Some(port) = cli.port {
        listen.set_port(port);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, model = %cfg.model_name, "serving");
    let address = cli.advertise_address.unwrap_or_else(|| bound.to_string());
    let replica_id = cli.replica_id.unwrap_or_else(|| address.clone());
    let _reporter = cli.control_plane.map(|endpoint| {
        tracing::info!(%endpoint, %replica_id, %address, "reporting state to the control plane");
        StateReporter::spawn(
            &state.engine,
            ReportTarget {
                endpoint,
                replica_id: replica_id.clone(),
                address,
                model: cfg.model_name.clone(),
                chunk_bytes: cfg.chunk_bytes,
            },
        )
    });
    serve_as(listener, state, Some(&replica_id)).await?;
    Ok(())
}
