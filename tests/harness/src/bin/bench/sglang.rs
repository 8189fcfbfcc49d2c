//! The SGLang router (`sglang-router` from PyPI, policy `cache_aware`, its
//! defaults otherwise) in front of the stack's replicas.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running router; killed on drop.
#[derive(Debug)]
pub(crate) struct Router {
    child: Child,
    port: u16,
}

/// A port free right now. The router cannot be handed a bound socket, so
/// this one choice can race; the readiness check below would catch a loss.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Router {
    pub(crate) async fn start(
        python: &Path,
        workers: &[SocketAddr],
        logs: &Path,
    ) -> anyhow::Result<Router> {
        let (port, metrics) = (free_port()?, free_port()?);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("sglang-router.log"))?;
        let mut cmd = Command::new(python);
        cmd.args(["-m", "sglang_router.launch_router", "--worker-urls"])
            .args(workers.iter().map(|a| format!("http://{a}")))
            .args(["--policy", "cache_aware"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--prometheus-port", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawn the sglang router")?;
        let mut router = Router { child, port };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let body = serde_json::json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 1,
        });
        loop {
            if let Ok(Some(status)) = router.child.try_wait() {
                bail!(
                    "sglang router exited with {status}; see {}",
                    logs.join("sglang-router.log").display()
                );
            }
            if client
                .post(format!("{}/v1/chat/completions", router.url()))
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(router);
            }
            if Instant::now() >= deadline {
                bail!(
                    "sglang router did not answer in 120 s; see {}",
                    logs.join("sglang-router.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
