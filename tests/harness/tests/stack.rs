//! Whole-stack tests: the control plane, two real model-server replicas
//! serving SmolLM2 and reporting to it, and Envoy configured by it, all on
//! 127.0.0.1 (`kvmesh_tests_harness::stack`). Clients are the official OpenAI
//! Python client and a Rust streaming client; failures are injected by
//! killing processes.
//!
//! Needs: `target/plugins/*.wasm` (scripts/build-plugins.sh), Envoy and the
//! `openai` package in `.venv` and the demo model (scripts/setup.sh), and the
//! `kvmesh-control-plane` and `kvmesh-gpu-server` binaries of this profile
//! (`cargo test --workspace` builds them). A missing piece prints SKIP, or
//! fails under scripts/test.sh (`KVMESH_NO_SKIP=1`).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvmesh_tests_harness::load::{Outcome, send};
use kvmesh_tests_harness::stack::{Stack, StackConfig};
use kvmesh_tests_harness::{envoy_bin, wait_until, workspace_root};
use serde_json::{Value, json};

/// One stack at a time: each runs three processes busy on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip(test: &str, why: &str) -> bool {
    use std::io::Write;
    assert!(
        std::env::var_os("KVMESH_NO_SKIP").is_none(),
        "{test}: {why} (KVMESH_NO_SKIP is set: scripts/test.sh installs everything)"
    );
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    true
}

/// The stack config for a test, or `None` (SKIP) when a prerequisite is missing.
fn config(test: &str, strategy: &str) -> Option<StackConfig> {
    let logs = std::env::temp_dir().join(format!("kvmesh-stack-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);
    let mut cfg = StackConfig::new(2, strategy, logs);
    // Small and quick: short prompts need few blocks; replies are short.
    cfg.replica_args = vec!["--kv-blocks".into(), "256".into()];
    cfg.ready_timeout = Duration::from_secs(240);
    let mut missing = Vec::new();
    for bin in ["kvmesh-control-plane", "kvmesh-gpu-server"] {
        if !cfg.bin_dir.join(bin).is_file() {
            missing.push(format!(
                "{} (cargo build --bin {bin})",
                cfg.bin_dir.join(bin).display()
            ));
        }
    }
    for p in ["round-robin", "prefix-aware", "kv-aware", "state-pump"] {
        let f = cfg.plugins_dir.join(format!("{p}.wasm"));
        if !f.is_file() {
            missing.push(format!("{} (scripts/build-plugins.sh)", f.display()));
        }
    }
    if !cfg.model.is_file() {
        missing.push(format!("{} (scripts/setup.sh)", cfg.model.display()));
    }
    if envoy_bin().is_err() {
        missing.push("Envoy (scripts/setup.sh)".into());
    }
    if missing.is_empty() {
        Some(cfg)
    } else {
        skip(test, &format!("missing {}", missing.join(", ")));
        None
    }
}

/// A system prompt long enough for several 256-byte routing chunks and
/// 16-token KV blocks, so prefix routing and caching both apply.
fn system_prompt(tenant: usize) -> String {
    let words = [
        "routing", "cache", "replica", "prefix", "tenant", "gateway", "envoy",
    ];
    (0..120)
        .map(|i| words[(i * 7 + tenant * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Clients sending streaming chat requests back to back until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
    start: Instant,
}

impl Load {
    fn start(stack: &Stack, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let base = stack.gateway_url();
        let model = stack.config().model_name.clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let tasks = (0..clients)
            .map(|c| {
                let (stop, done, base, model, http) =
                    (stop.clone(), done.clone(), base.clone(), model.clone(), http.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({
                            "model": model,
                            "messages": [
                                {"role": "system", "content": system_prompt(c % 2)},
                                {"role": "user", "content": format!("Question {n} from client {c}: name a colour.")},
                            ],
                            "max_tokens": 6,
                            "temperature": 0,
                        });
                        out.push(send(&http, &base, "/v1/chat/completions", body, true, start).await);
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            done,
            tasks,
            start,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits until `more` further requests completed.
    async fn wait_more(&self, more: usize, what: &str) {
        let target = self.done.load(Ordering::Relaxed) + more;
        let done = self.done.clone();
        wait_until(what, Duration::from_secs(180), || {
            let done = done.clone();
            async move { done.load(Ordering::Relaxed) >= target }
        })
        .await
        .expect("load progresses");
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    }
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| !o.ok).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_through_the_gateway_and_a_malformed_request_gets_400() {
    const TEST: &str = "openai_client";
    let Some(cfg) = config(TEST, "prefix-aware") else {
        return;
    };
    let python = workspace_root().join(".venv/bin/python");
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        skip(TEST, "no `openai` package in .venv (scripts/setup.sh)");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start(cfg).await.expect("stack starts");

    // The official client: chat (plain and streaming), completions, cached
    // tokens on a repeated prompt, and its BadRequestError on a 400.
    let script = workspace_root().join("tests/harness/tests/openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("{}/v1", stack.gateway_url()))
        .arg(&stack.config().model_name)
        .arg(system_prompt(0))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("openai client: all checks passed"),
        "openai client script failed ({}):\n{stdout}\n{stderr}\nlogs in {}",
        out.status,
        stack.logs().display()
    );

    // A body that is not JSON, and one with a bad field: the model server's
    // own 400 in the OpenAI error shape comes back through the gateway.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", stack.gateway_url());
    for (body, needle) in [
        (r#"{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user""#.to_owned(), ""),
        (
            json!({"model": stack.config().model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"})
                .to_string(),
            "max_tokens",
        ),
    ] {
        let resp = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400, "body {body}");
        let v: Value = resp.json().await.expect("JSON error body");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && v["error"]["type"].is_string(),
            "OpenAI error shape expected, got {v}"
        );
        assert!(message.contains(needle), "{message:?} should name {needle:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_load_fails_only_requests_already_streaming() {
    const TEST: &str = "replica_killed";
    let Some(cfg) = config(TEST, "prefix-aware") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(cfg).await.expect("stack starts");
    let survivor = stack.replica_addrs()[0];
    let load = Load::start(&stack, 4);
    load.wait_more(8, "requests before the kill").await;

    // A kill takes time: SIGKILL, then the process's exit, which closes its
    // sockets (`kill_replica` returns once it is reaped). A stream may break
    // anywhere in that interval, so the bound below uses both ends: on the
    // CI machine a dying replica kept a stream open for a second.
    let kill_from = load.now();
    stack.kill_replica(1);
    let killed_at = load.now();
    // Until the control plane drops it from EDS (replica_silence_ms), Envoy
    // may still pick the dead replica: those requests must be retried on the
    // survivor, not fail.
    load.wait_more(4, "requests while the dead replica is still in EDS")
        .await;
    stack
        .wait_eds(&[survivor])
        .await
        .expect("dead replica leaves EDS");
    let left_eds_at = load.now();
    load.wait_more(6, "requests after it left EDS").await;
    let outcomes = load.finish().await;

    // The bound: a request may fail only if its response was already
    // streaming when the replica died (headers before the process was gone,
    // still running once the kill began). At most that many fail; everything
    // sent after the kill succeeds.
    let streaming =
        |o: &Outcome| o.headers.is_some_and(|h| h < killed_at) && o.sent + o.e2e >= kill_from;
    let streaming_at_kill = outcomes.iter().filter(|o| streaming(o)).count();
    let failed = failures(&outcomes);
    for f in &failed {
        assert!(
            streaming(f),
            "a request that was not streaming at the kill ({kill_from:?} to {killed_at:?}) failed: {f:?}"
        );
    }
    assert!(
        failed.len() <= streaming_at_kill,
        "{} failed, but only {streaming_at_kill} were streaming at the kill",
        failed.len()
    );
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent > killed_at).collect();
    assert!(
        after.iter().all(|o| o.ok),
        "a request sent after the kill failed"
    );
    let in_gap = after.iter().filter(|o| o.sent < left_eds_at).count();
    assert!(
        in_gap > 0,
        "no request was sent while the dead replica was in EDS"
    );
    eprintln!(
        "{TEST}: {} requests, {} failed (bound {streaming_at_kill}), {} sent after the kill ({in_gap} while it was still in EDS)",
        outcomes.len(),
        failed.len(),
        after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_and_strategy_swaps_under_load_fail_nothing() {
    const TEST: &str = "cp_restart_swap";
    let Some(cfg) = config(TEST, "prefix-aware") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start(cfg).await.expect("stack starts");
    let replicas = stack.replica_addrs();
    let load = Load::start(&stack, 4);
    load.wait_more(6, "requests before the restart").await;

    // Control plane down: Envoy keeps serving its last config.
    stack.kill_control_plane();
    load.wait_more(6, "requests while the control plane is down")
        .await;
    stack
        .restart_control_plane()
        .await
        .expect("control plane back with both replicas");
    load.wait_more(6, "requests after the restart").await;
    stack.wait_eds(&replicas).await.expect("EDS unchanged");

    // Strategy swaps under load, each ACKed by Envoy.
    for strategy in ["kv-aware", "round-robin"] {
        stack
            .set_strategy(strategy, json!({}))
            .await
            .expect("swap ACKed");
        assert_eq!(stack.strategy().await.expect("pools"), strategy);
        load.wait_more(6, "requests after the swap").await;
        let decisions =
            envoy_stat(&stack, &format!("wasmcustom.kvmesh.{strategy}.decisions")).await;
        assert!(
            decisions > 0,
            "no {strategy} decisions counted after the swap"
        );
    }
    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    // Each response names the strategy that routed it: the bench's record of
    // where every request went.
    let strategy_of = |o: &Outcome| {
        o.decision
            .as_deref()
            .and_then(|d| d.strip_prefix("strategy="))
            .and_then(|d| d.split(';').next())
            .map(str::to_owned)
    };
    let named: Vec<Option<String>> = outcomes.iter().map(strategy_of).collect();
    assert!(
        named.iter().all(|s| matches!(
            s.as_deref(),
            Some("prefix-aware" | "kv-aware" | "round-robin")
        )),
        "a response without a kvmesh decision: {named:?}"
    );
    assert!(
        named.iter().any(|s| s.as_deref() == Some("round-robin")),
        "no response routed by round-robin after the last swap: {named:?}"
    );
    // And each names the replica that answered, the one the decision chose.
    let addrs = stack.replica_addrs();
    for o in &outcomes {
        let endpoint = o
            .decision
            .as_deref()
            .and_then(|d| d.split("; ").find_map(|f| f.strip_prefix("endpoint=")));
        let answered = o.replica.as_deref().and_then(|id| {
            let i: usize = id.strip_prefix("replica-")?.parse().ok()?;
            addrs.get(i).map(ToString::to_string)
        });
        assert_eq!(
            answered.as_deref(),
            endpoint,
            "x-kvmesh-replica {:?} against the decision {:?}",
            o.replica,
            o.decision
        );
    }
    eprintln!("{TEST}: {} requests, none failed", outcomes.len());
}

/// A counter from Envoy's admin `/stats` (0 if absent).
async fn envoy_stat(stack: &Stack, name: &str) -> u64 {
    let text = reqwest::get(format!(
        "http://{}/stats?filter={name}",
        stack.envoy_admin()
    ))
    .await
    .expect("envoy admin")
    .text()
    .await
    .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}
