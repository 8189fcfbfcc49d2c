//! `kvmesh-controller`: runs the Kubernetes controller, renders resources offline, imports
//! HyperPod resources and prints the CRDs.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kvmesh_control_plane_controller::{crd, hyperpod, offline, reconcile, render, run};

#[derive(Parser, Debug)]
#[command(name = "kvmesh-controller", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct RenderArgs {
    /// Prometheus address for KEDA triggers that name none.
    #[arg(
        long,
        env = "KVMESH_PROMETHEUS_ADDRESS",
        default_value = "http://prometheus-operated.monitoring.svc:9090"
    )]
    prometheus_address: String,
    /// Control-plane address handed to the model servers (KVMESH_CONTROL_PLANE); empty for none.
    #[arg(
        long,
        env = "KVMESH_CONTROL_PLANE",
        default_value = "http://kvmesh-control-plane.kvmesh-system.svc:18000"
    )]
    control_plane_address: String,
}

impl RenderArgs {
    fn config(&self) -> render::RenderConfig {
        render::RenderConfig {
            prometheus_address: self.prometheus_address.clone(),
            control_plane_address: Some(self.control_plane_address.clone())
                .filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the controller against the cluster in the kubeconfig or service account.
    Run {
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Render every Kubernetes object a resource file produces (offline, for GitOps).
    Render {
        /// YAML file with InferenceEndpointConfig / CatalogModel documents ("-" for stdin).
        file: PathBuf,
        /// Catalog ConfigMap YAML, needed for CatalogModel documents.
        #[arg(long)]
        catalog: Option<PathBuf>,
        #[command(flatten)]
        render: RenderArgs,
    },
    /// Convert HyperPod InferenceEndpointConfig / JumpStartModel resources to kvmesh ones;
    /// the report of fields not carried over goes to stderr.
    ImportHyperpod {
        /// YAML file ("-" for stdin).
        file: PathBuf,
        /// Exit with status 2 when any field was not carried over as is.
        #[arg(long)]
        strict: bool,
    },
    /// Print the CRDs as YAML.
    Crdgen,
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { render } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the cluster")?;
            let ctx =
                reconcile::Context::new(client.clone(), render.config(), reconcile::Clock::new());
            tracing::info!("kvmesh-controller running");
            run::run(client, ctx).await;
        }
        Cmd::Render {
            file,
            catalog,
            render,
        } => {
            let input = read(&file)?;
            let catalog = catalog.as_ref().map(read).transpose()?;
            print!(
                "{}",
                offline::render_yaml(&input, catalog.as_deref(), &render.config())?
            );
        }
        Cmd::ImportHyperpod { file, strict } => {
            let imported = hyperpod::import_yaml(&read(&file)?)?;
            for i in &imported {
                print!("---\n{}", serde_yaml_ng::to_string(&i.resource)?);
            }
            let report = hyperpod::report_text(&imported);
            eprint!("{report}");
            if strict && imported.iter().any(|i| !i.findings.is_empty()) {
                bail!("some fields were not carried over as is (see above)");
            }
        }
        Cmd::Crdgen => print!("{}", crd::crds_yaml()?),
    }
    Ok(())
}
