//! The whole kvmesh stack on one machine, all on 127.0.0.1: the control plane
//! (`kvmesh-control-plane serve`), N model-server replicas
//! (`kvmesh-gpu-server`) that report to it, and Envoy with
//! `envoy/bootstrap-dynamic.yaml`, which gets everything (listener, pool
//! cluster, replicas by EDS, the routing plugin by ECDS, live replica state
//! by the state pump) from the control plane.
//!
//! Ports: the control plane and the replicas bind port 0 and say which port
//! they got (the control plane on its first stdout line, a replica by
//! registering its bound address); Envoy binds the gateway listener on port 0
//! (or a fixed port) and its admin address is read from
//! `--admin-address-path`. A restarted process binds the port it had, so
//! Envoy's bootstrap and EDS stay right. Every wait polls a real condition
//! with a deadline. Each component logs to its own file in one directory
//! (appending across restarts); everything is killed on drop.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::envoy::{envoy_bin, workspace_root};

/// The built-in strategies, each a module under `target/plugins/`.
pub const STRATEGIES: &[&str] = &["round-robin", "prefix-aware", "kv-aware"];

/// What to start.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Number of model-server replicas.
    pub replicas: usize,
    /// Initial routing strategy (one of [`STRATEGIES`]).
    pub strategy: String,
    /// The model file (GGUF or HF directory).
    pub model: PathBuf,
    /// The model name clients send; the pool serves this model.
    pub model_name: String,
    /// Pool name (Envoy listener and cluster `kvmesh/<pool>`).
    pub pool: String,
    /// Gateway port; 0 = any free port.
    pub gateway_port: u16,
    /// Envoy worker threads.
    pub envoy_concurrency: u32,
    /// Extra flags for every replica (KV sizes, tiers, batching).
    pub replica_args: Vec<String>,
    /// Where `kvmesh-control-plane` and `kvmesh-gpu-server` are.
    pub bin_dir: PathBuf,
    /// Where the built plugins are (`<name>.wasm`, `state-pump.wasm`).
    pub plugins_dir: PathBuf,
    /// Log directory (created); config files and the module store go here too.
    pub logs: PathBuf,
    /// Control-plane `warmup_ms` (replicas re-register meanwhile after a restart).
    pub warmup_ms: u64,
    /// Control-plane `replica_silence_ms` (a silent replica leaves EDS).
    pub replica_silence_ms: u64,
    /// Deadline for each readiness wait (model loading included).
    pub ready_timeout: Duration,
}

impl StackConfig {
    /// Defaults for this checkout: the demo model, binaries next to the
    /// running executable's profile directory, plugins in `target/plugins`.
    pub fn new(replicas: usize, strategy: &str, logs: impl Into<PathBuf>) -> Self {
        let root = workspace_root();
        StackConfig {
            replicas,
            strategy: strategy.to_owned(),
            model: root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_name: "SmolLM2-135M-Instruct".to_owned(),
            pool: "demo".to_owned(),
            gateway_port: 0,
            envoy_concurrency: 2,
            replica_args: Vec::new(),
            bin_dir: profile_dir(),
            plugins_dir: root.join("target/plugins"),
            logs: logs.into(),
            // Above the replicas' 1 s reconnect backoff cap (a restart must not publish a
            // pool before they are back).
            warmup_ms: 2000,
            replica_silence_ms: 3000,
            ready_timeout: Duration::from_secs(180),
        }
    }

    fn bin(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if !p.is_file() {
            bail!(
                "{} is missing: build it (cargo build -p {} --bin {name})",
                p.display(),
                if name == "kvmesh-gpu-server" {
                    "kvmesh-gpu-server-server"
                } else {
                    "kvmesh-control-plane-server"
                }
            );
        }
        Ok(p)
    }

    /// The module of a strategy.
    pub fn module(&self, strategy: &str) -> anyhow::Result<PathBuf> {
        let p = self.plugins_dir.join(format!("{strategy}.wasm"));
        if !p.is_file() {
            bail!("{} is missing: run scripts/build-plugins.sh", p.display());
        }
        Ok(p)
    }
}

/// The profile directory (`target/debug` or `target/release`) of the running
/// executable: a test binary lives in `<profile>/deps`, a binary in `<profile>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// What a stack start is doing, for progress displays.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Starting the control plane.
    ControlPlane,
    /// Replicas loading the model and registering (`n` of `of` ready).
    Replicas {
        /// Ready so far.
        n: usize,
        /// All of them.
        of: usize,
    },
    /// Envoy starting and taking its config from the control plane.
    Envoy,
    /// Waiting for the replicas in Envoy's EDS and a request answered.
    Gateway,
}

/// One child process with its log file.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A replica as the stack knows it.
#[derive(Debug)]
struct Replica {
    id: String,
    /// Flags replacing [`StackConfig::replica_args`] for this replica.
    args: Option<Vec<String>>,
    /// Bound address, once it registered.
    addr: Option<SocketAddr>,
    proc: Proc,
}

/// The running stack; everything is killed on drop.
#[derive(Debug)]
pub struct Stack {
    cfg: StackConfig,
    token: String,
    cp_config: PathBuf,
    cp_grpc: SocketAddr,
    cp_admin: SocketAddr,
    cp: Proc,
    replicas: Vec<Replica>,
    envoy: Proc,
    envoy_admin: SocketAddr,
    gateway: SocketAddr,
    http: reqwest::Client,
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .with_context(|| format!("log file for {name} in {}", dir.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Polls `f` every 50 ms until it gives `Some`, or fails naming `what`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Stack {
    /// Starts everything and waits until the gateway answers a request.
    pub async fn start(cfg: StackConfig) -> anyhow::Result<Stack> {
        Self::start_with_progress(cfg, |_| {}).await
    }

    /// [`Stack::start`], calling `progress` as phases change.
    pub async fn start_with_progress(
        cfg: StackConfig,
        mut progress: impl FnMut(Phase),
    ) -> anyhow::Result<Stack> {
        if cfg.replicas == 0 {
            bail!("a stack needs at least one replica");
        }
        if !cfg.model.exists() {
            bail!(
                "model {} is missing (scripts/setup.sh fetches the demo model)",
                cfg.model.display()
            );
        }
        std::fs::create_dir_all(&cfg.logs)?;
        let logs = std::path::absolute(&cfg.logs)?;
        let token = format!(
            "kvmesh-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let mut stack = Stack {
            token,
            cp_config: logs.join("control-plane.yaml"),
            cp_grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            cp_admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            cp: Proc {
                name: "control-plane".into(),
                child: None,
            },
            replicas: Vec::new(),
            envoy: Proc {
                name: "envoy".into(),
                child: None,
            },
            envoy_admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway: SocketAddr::from(([127, 0, 0, 1], cfg.gateway_port)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            cfg: StackConfig { logs, ..cfg },
        };

        progress(Phase::ControlPlane);
        stack.write_cp_config()?;
        stack.spawn_cp()?;

        let n = stack.cfg.replicas;
        progress(Phase::Replicas { n: 0, of: n });
        for i in 0..n {
            let id = format!("replica-{i}");
            let proc = stack.spawn_replica(&id, None, None)?;
            stack.replicas.push(Replica {
                id,
                args: None,
                addr: None,
                proc,
            });
        }
        let mut ready = BTreeSet::new();
        let timeout = stack.cfg.ready_timeout;
        let deadline = Instant::now() + timeout;
        while ready.len() < n {
            for i in 0..n {
                if !ready.contains(&i) && stack.replica_ready(i).await? {
                    ready.insert(i);
                    progress(Phase::Replicas {
                        n: ready.len(),
                        of: n,
                    });
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "replicas not registered and healthy in {timeout:?}; see {}",
                    stack.cfg.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        progress(Phase::Envoy);
        stack.spawn_envoy().await?;
        progress(Phase::Gateway);
        stack.wait_gateway().await?;
        Ok(stack)
    }

    fn write_cp_config(&self) -> anyhow::Result<()> {
        let c = &self.cfg;
        let module = c.module(&c.strategy)?;
        let yaml = format!(
            "# Written by kvmesh-tests-harness::stack; rewritten on every start.\n\
             grpc: {grpc}\n\
             admin: 127.0.0.1:0\n\
             replica_silence_ms: {silence}\n\
             warmup_ms: {warmup}\n\
             publish_interval_ms: 20\n\
             module_store: {store}\n\
             pools:\n\
             \x20 - name: {pool}\n\
             \x20   model: {model}\n\
             \x20   listener: 127.0.0.1:{port}\n\
             \x20   strategy:\n\
             \x20     name: {strategy}\n\
             \x20     module: {module}\n",
            grpc = self.cp_grpc,
            silence = c.replica_silence_ms,
            warmup = c.warmup_ms,
            store = c.logs.join("modules").display(),
            pool = c.pool,
            model = c.model_name,
            port = c.gateway_port,
            strategy = c.strategy,
            module = module.display(),
        );
        std::fs::write(&self.cp_config, yaml)?;
        Ok(())
    }

    /// Starts the control plane with the written config and reads its bound
    /// addresses from its first stdout line.
    fn spawn_cp(&mut self) -> anyhow::Result<()> {
        let log = log_file(&self.cfg.logs, "control-plane")?;
        let mut child = Command::new(self.cfg.bin("kvmesh-control-plane")?)
            .args(["serve", "--config"])
            .arg(&self.cp_config)
            .env("KVMESH_ADMIN_TOKEN", &self.token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .spawn()
            .context("spawn kvmesh-control-plane")?;
        let stdout = child.stdout.take().context("control-plane stdout")?;
        self.cp.child = Some(child);
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep draining stdout into the log so later writes never block.
        let mut sink = log;
        let _ = writeln!(sink, "{}", line.trim_end());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut sink);
        });
        let field = |k: &str| -> anyhow::Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .with_context(|| {
                    format!(
                        "control plane did not say where it listens ({line:?}); log:\n{}",
                        tail(&self.cfg.logs.join("control-plane.log"))
                    )
                })?
                .parse()
                .context("control-plane address")
        };
        self.cp_grpc = field("grpc=")?;
        self.cp_admin = field("admin=")?;
        Ok(())
    }

    fn spawn_replica(
        &self,
        id: &str,
        addr: Option<SocketAddr>,
        args: Option<&[String]>,
    ) -> anyhow::Result<Proc> {
        let c = &self.cfg;
        let log = log_file(&c.logs, id)?;
        let listen = addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let child = Command::new(c.bin("kvmesh-gpu-server")?)
            .arg("--model")
            .arg(&c.model)
            .args(["--model-name", &c.model_name])
            .args(["--listen", &listen.to_string()])
            .args(["--control-plane", &format!("http://{}", self.cp_grpc)])
            .args(["--replica-id", id])
            .args(args.unwrap_or(&c.replica_args))
            .env("RUST_LOG", "info")
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn kvmesh-gpu-server")?;
        Ok(Proc {
            name: id.to_owned(),
            child: Some(child),
        })
    }

    /// Registered with the control plane (connected) and `/health` answers.
    async fn replica_ready(&mut self, i: usize) -> anyhow::Result<bool> {
        if !self.replicas[i].proc.running() {
            let id = &self.replicas[i].id;
            bail!(
                "{id} exited; its log:\n{}",
                tail(&self.cfg.logs.join(format!("{id}.log")))
            );
        }
        let id = self.replicas[i].id.clone();
        let Some(r) = self
            .control_plane_replicas()
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["connected"] == true)
        else {
            return Ok(false);
        };
        let addr: SocketAddr = r["address"]
            .as_str()
            .context("replica address")?
            .parse()
            .context("replica address")?;
        self.replicas[i].addr = Some(addr);
        Ok(self
            .http
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()))
    }

    async fn spawn_envoy(&mut self) -> anyhow::Result<()> {
        let root = workspace_root();
        let template = std::fs::read_to_string(root.join("envoy/bootstrap-dynamic.yaml"))?;
        let pump = self.cfg.plugins_dir.join("state-pump.wasm");
        if !pump.is_file() {
            bail!(
                "{} is missing: run scripts/build-plugins.sh",
                pump.display()
            );
        }
        let yaml = template
            .replace(
                "port_value: 18000",
                &format!("port_value: {}", self.cp_grpc.port()),
            )
            .replace("port_value: 9901", "port_value: 0")
            .replace("target/plugins/state-pump.wasm", &pump.to_string_lossy());
        let config = self.cfg.logs.join("envoy.yaml");
        std::fs::write(&config, yaml)?;
        let admin_path = self.cfg.logs.join("envoy-admin-address");
        let _ = std::fs::remove_file(&admin_path);
        let log = log_file(&self.cfg.logs, "envoy")?;
        let child = Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &self.cfg.envoy_concurrency.to_string()])
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["-l", "info"])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn envoy")?;
        self.envoy.child = Some(child);
        let logs = self.cfg.logs.clone();
        let envoy = &mut self.envoy;
        self.envoy_admin = poll("Envoy's admin address", Duration::from_secs(60), || {
            let running = envoy.running();
            let text = std::fs::read_to_string(&admin_path).ok();
            let logs = logs.clone();
            async move {
                if !running {
                    bail!("envoy exited; its log:\n{}", tail(&logs.join("envoy.log")));
                }
                Ok(text.and_then(|t| t.trim().parse().ok()))
            }
        })
        .await?;
        Ok(())
    }

    /// Every running replica in Envoy's EDS, the gateway listener bound, and
    /// one request answered through it.
    pub async fn wait_gateway(&mut self) -> anyhow::Result<()> {
        let timeout = self.cfg.ready_timeout;
        let listener = format!("kvmesh/{}", self.cfg.pool);
        let admin = self.envoy_admin;
        let http = self.http.clone();
        self.gateway = poll("the gateway listener", timeout, || {
            let http = http.clone();
            let listener = listener.clone();
            async move {
                let Ok(r) = http
                    .get(format!("http://{admin}/listeners?format=json"))
                    .send()
                    .await
                else {
                    return Ok(None);
                };
                let v: Value = r.json().await.unwrap_or_default();
                Ok(v["listener_statuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|l| l["name"] == listener.as_str())
                    .and_then(|l| {
                        let sa = &l["local_address"]["socket_address"];
                        let port = u16::try_from(sa["port_value"].as_u64()?).ok()?;
                        (port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], port)))
                    }))
            }
        })
        .await?;
        self.wait_eds(&self.replica_addrs()).await?;
        let url = self.gateway_url();
        let body = self.chat_body("Say hi.", 1);
        poll("a request answered through the gateway", timeout, || {
            let http = http.clone();
            let url = url.clone();
            let body = body.clone();
            async move {
                Ok(http
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        })
        .await
    }

    /// Waits until Envoy's pool cluster has exactly `addrs` as members.
    pub async fn wait_eds(&self, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        let want: BTreeSet<SocketAddr> = addrs.iter().copied().collect();
        poll(
            &format!("EDS members {want:?}"),
            self.cfg.ready_timeout,
            || {
                let want = want.clone();
                async move { Ok((self.eds_members().await? == want).then_some(())) }
            },
        )
        .await
    }

    /// The members of the pool cluster in Envoy right now.
    pub async fn eds_members(&self) -> anyhow::Result<BTreeSet<SocketAddr>> {
        let cluster = format!("kvmesh/{}", self.cfg.pool);
        let Ok(r) = self
            .http
            .get(format!("http://{}/clusters?format=json", self.envoy_admin))
            .send()
            .await
        else {
            return Ok(BTreeSet::new());
        };
        let v: Value = r.json().await.unwrap_or_default();
        Ok(v["cluster_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == cluster.as_str())
            .flat_map(|c| c["host_statuses"].as_array().cloned().unwrap_or_default())
            .filter_map(|h| {
                let sa = &h["address"]["socket_address"];
                format!("{}:{}", sa["address"].as_str()?, sa["port_value"].as_u64()?)
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// A small chat request body for this stack's model.
    pub fn chat_body(&self, prompt: &str, max_tokens: u32) -> Value {
        json!({
            "model": self.cfg.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        })
    }

    /// `http://127.0.0.1:<port>` of the gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway)
    }

    /// Envoy's admin `host:port`.
    pub fn envoy_admin(&self) -> SocketAddr {
        self.envoy_admin
    }

    /// The control plane's admin base URL.
    pub fn control_plane_url(&self) -> String {
        format!("http://{}", self.cp_admin)
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &StackConfig {
        &self.cfg
    }

    /// The log directory.
    pub fn logs(&self) -> &Path {
        &self.cfg.logs
    }

    /// Each replica's serving address (those that registered).
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().filter_map(|r| r.addr).collect()
    }

    /// `/v1/replicas` of the control plane.
    pub async fn control_plane_replicas(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self
            .http
            .get(format!("{}/v1/replicas", self.control_plane_url()))
            .send()
            .await?
            .json()
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// SIGKILLs replica `i` (a crash).
    pub fn kill_replica(&mut self, i: usize) {
        self.replicas[i].proc.kill();
    }

    /// Starts replica `i` again on its old address (cold cache) and waits
    /// until it is registered, healthy and in EDS.
    pub async fn restart_replica(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_replica_with(i, None).await
    }

    /// [`Stack::restart_replica`] with `args` instead of the configured
    /// replica flags (`None`: back to those).
    pub async fn restart_replica_with(
        &mut self,
        i: usize,
        args: Option<Vec<String>>,
    ) -> anyhow::Result<()> {
        self.replicas[i].proc.kill();
        self.replicas[i].args = args;
        let (id, addr) = (self.replicas[i].id.clone(), self.replicas[i].addr);
        self.replicas[i].proc = self.spawn_replica(&id, addr, self.replicas[i].args.as_deref())?;
        let timeout = self.cfg.ready_timeout;
        let deadline = Instant::now() + timeout;
        while !self.replica_ready(i).await? {
            if Instant::now() >= deadline {
                bail!("{id} not back in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_eds(&self.replica_addrs()).await
    }

    /// Restarts every replica (cold caches), one after the other.
    pub async fn restart_replicas(&mut self) -> anyhow::Result<()> {
        for i in 0..self.replicas.len() {
            self.restart_replica(i).await?;
        }
        Ok(())
    }

    /// SIGKILLs the control plane (a crash). Envoy keeps serving its last config.
    pub fn kill_control_plane(&mut self) {
        self.cp.kill();
    }

    /// Starts the control plane again on its old gRPC port and waits until it
    /// is past warm-up with every running replica connected again.
    pub async fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        self.cp.kill();
        self.write_cp_config()?;
        self.spawn_cp()?;
        let want: BTreeSet<String> = self.replicas.iter().map(|r| r.id.clone()).collect();
        let url = self.control_plane_url();
        let this = &*self;
        poll(
            "control plane warm with every replica connected",
            this.cfg.ready_timeout,
            || {
                let want = want.clone();
                let url = url.clone();
                async move {
                    let warm = this
                        .http
                        .get(format!("{url}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    let connected: BTreeSet<String> = this
                        .control_plane_replicas()
                        .await
                        .unwrap_or_default()
                        .iter()
                        .filter(|r| r["connected"] == true)
                        .filter_map(|r| r["id"].as_str().map(str::to_owned))
                        .collect();
                    Ok((warm && connected == want).then_some(()))
                }
            },
        )
        .await
    }

    /// Sets the pool's strategy through the control plane's admin API and
    /// waits for Envoy's ACK (an error on NACK or no answer in time).
    pub async fn set_strategy(&self, strategy: &str, params: Value) -> anyhow::Result<()> {
        let module = self.cfg.module(strategy)?;
        let resp = self
            .http
            .put(format!(
                "{}/v1/pools/{}/strategy",
                self.control_plane_url(),
                self.cfg.pool
            ))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60))
            .json(&json!({"name": strategy, "module": module, "params": params}))
            .send()
            .await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.as_u16() != 200 {
            bail!("strategy {strategy}: control plane answered {status}: {body}");
        }
        Ok(())
    }

    /// The strategy the control plane says the pool runs.
    pub async fn strategy(&self) -> anyhow::Result<String> {
        let v: Value = self
            .http
            .get(format!("{}/v1/pools", self.control_plane_url()))
            .send()
            .await?
            .json()
            .await?;
        v.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == self.cfg.pool.as_str())
            .and_then(|p| p["strategy"]["name"].as_str().map(str::to_owned))
            .context("pool strategy")
    }

    /// The components whose process is not running (empty when all are).
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for p in std::iter::once(&mut self.cp)
            .chain(std::iter::once(&mut self.envoy))
            .chain(self.replicas.iter_mut().map(|r| &mut r.proc))
        {
            if !p.running() {
                dead.push(p.name.clone());
            }
        }
        dead
    }

    /// Kills everything now (also done on drop).
    pub fn stop(&mut self) {
        self.envoy.kill();
        for r in &mut self.replicas {
            r.proc.kill();
        }
        self.cp.kill();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}
