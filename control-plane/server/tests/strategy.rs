//! Strategy hot-swap through the admin API against real Envoy: swaps under
//! continuous load fail no request and are each ACKed; a module Envoy cannot
//! load is NACKed, reported, and the previous one keeps serving; rollback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

async fn put_strategy(cp: &ControlPlane, token: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(cp.url("/v1/pools/pool-a/strategy"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("PUT strategy");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read module"),
    ))
}

/// The modules to swap between: every routing filter that was built, and
/// the state probe (a pass-through filter) as a stand-in when none is.
fn modules() -> Vec<(String, std::path::PathBuf)> {
    let root = repo_root().join("target/plugins");
    let mut out: Vec<(String, std::path::PathBuf)> = ["round-robin", "prefix-aware", "kv-aware"]
        .into_iter()
        .map(|n| (n.to_string(), root.join(format!("{n}.wasm"))))
        .filter(|(_, p)| p.exists())
        .collect();
    let probe = root.join("state-probe.wasm");
    if probe.exists() {
        out.push(("state-probe".into(), probe));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_swaps_under_load_fail_nothing_and_bad_modules_are_nacked() {
    let test = "strategy_swaps_under_load_fail_nothing_and_bad_modules_are_nacked";
    let Some(bin) = envoy_bin(test) else { return };
    let modules = modules();
    if modules.is_empty() {
        assert!(
            std::env::var_os("KVMESH_NO_SKIP").is_none(),
            "a prerequisite is missing under scripts/test.sh (KVMESH_NO_SKIP)"
        );
        eprintln!(
            "SKIP {test}: no wasm filters under target/plugins (run scripts/build-plugins.sh)"
        );
        return;
    }
    let dir = tempdir("swap");
    let listener = free_port();
    let (first_name, first) = &modules[0];
    let strategy = format!(
        "    strategy: {{ name: {first_name}, module: {} }}\n",
        first.display()
    );
    let yaml = cp_yaml(
        0,
        listener,
        &dir.join("store"),
        "warmup_ms: 0\nreplica_silence_ms: 2000",
        &strategy,
    );
    let cp = ControlPlane::start(&dir, &yaml);
    let envoy = Envoy::start(&bin, &dir, cp.grpc, None);
    let client = reqwest::Client::new();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let _ra = a.reporter(cp.grpc);
    let _rb = b.reporter(cp.grpc);
    eventually("traffic through the filter", WAIT, || async {
        (seen(&client, listener, 20).await.len() == 2).then_some(())
    })
    .await;

    // Changes need the token.
    let (status, _) = put_strategy(&cp, "wrong", json!({"name": "x", "module": first})).await;
    assert_eq!(status, 401);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, client) = (stop.clone(), ok.clone(), failed.clone(), client.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match via_envoy(&client, listener).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.lock().expect("lock").push(e),
                }
            }
        }));
    }

    // Ten swaps: code changes between modules and config-only changes.
    for i in 0..10 {
        let (name, path) = &modules[i % modules.len()];
        // Parameters change on every push, so config-only swaps happen too.
        let params = match name.as_str() {
            "kv-aware" => json!({"load_weight": 1.0 + i as f64 / 10.0}),
            "prefix-aware" => json!({"load_factor": 1.25 + i as f64 / 100.0}),
            "round-robin" => json!({"max_fallbacks": 1 + i % 2}),
            _ => json!({"round": i}),
        };
        let body = json!({"name": name, "module": path, "sha256": sha256(path), "params": params});
        let (status, report) = put_strategy(&cp, &cp.token, body).await;
        assert_eq!(status, 200, "swap {i} to {name}: {report}");
        assert_eq!(report["result"], "acked");
        let before = ok.load(Ordering::SeqCst);
        eventually("load after swap", WAIT, || async {
            (ok.load(Ordering::SeqCst) > before + 20).then_some(())
        })
        .await;
    }
    let serving = cp.get_json("/v1/pools").await[0]["strategy"]["sha256"].clone();

    // A module Envoy cannot compile: NACKed, reported, the old one keeps serving.
    let bad = dir.join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0\xff\xff\xff\xff garbage").expect("write bad module");
    let (status, report) =
        put_strategy(&cp, &cp.token, json!({"name": "broken", "module": bad})).await;
    assert_eq!(status, 409, "{report}");
    assert_eq!(report["result"], "nacked");
    assert!(
        !report["nacked"][0][1].as_str().unwrap_or("").is_empty(),
        "NACK carries Envoy's reason: {report}"
    );
    assert_eq!(
        cp.get_json("/v1/pools").await[0]["strategy"]["sha256"],
        serving
    );
    let before = ok.load(Ordering::SeqCst);
    eventually("load after NACK", WAIT, || async {
        (ok.load(Ordering::SeqCst) > before + 50).then_some(())
    })
    .await;
    assert!(cp.metrics().await.contains("outcome=\"nacked\""));

    // The CLI reports the NACK too, with a failing exit status.
    let out = std::process::Command::new(control_plane_bin())
        .args([
            "set-strategy",
            "--pool",
            "pool-a",
            "--name",
            "broken",
            "--module",
        ])
        .arg(&bad)
        .args(["--admin", &cp.url("")])
        .env("KVMESH_ADMIN_TOKEN", &cp.token)
        .output()
        .expect("run CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "CLI must fail on a NACK: {stdout}");
    assert!(
        stdout.contains("\"nacked\""),
        "CLI output names the NACK: {stdout}"
    );
    let out = std::process::Command::new(control_plane_bin())
        .args(["pools", "--admin", &cp.url("")])
        .output()
        .expect("run CLI");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(serving.as_str().unwrap_or("?")));

    // Parameters the filter refuses (its on_configure returns false): NACKed too.
    if let Some((name, path)) = modules.iter().find(|(n, _)| n == "kv-aware") {
        let body = json!({"name": name, "module": path, "params": {"no_such_knob": 1}});
        let (status, report) = put_strategy(&cp, &cp.token, body).await;
        assert_eq!(status, 409, "{report}");
        assert_eq!(
            cp.get_json("/v1/pools").await[0]["strategy"]["sha256"],
            serving
        );
    }

    // A pinned sha256 that does not match is refused before any push.
    let (name, path) = &modules[0];
    let (status, _) = put_strategy(
        &cp,
        &cp.token,
        json!({"name": name, "module": path, "sha256": "0".repeat(64)}),
    )
    .await;
    assert_eq!(status, 400);

    // A module by http:// URL, pinned by sha256, is fetched and ACKed.
    let (name, path) = &modules[modules.len() - 1];
    let bytes = std::fs::read(path).expect("module");
    let server = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/module.wasm", server.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/module.wasm",
        axum::routing::get(move || async move { bytes }),
    );
    let serve = tokio::spawn(async move { axum::serve(server, app).await });
    let (status, report) = put_strategy(
        &cp,
        &cp.token,
        json!({"name": name, "module": url, "sha256": sha256(path)}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    serve.abort();

    // Rollback goes one step back and is ACKed.
    let resp = reqwest::Client::new()
        .post(cp.url("/v1/pools/pool-a/rollback"))
        .bearer_auth(&cp.token)
        .send()
        .await
        .expect("rollback");
    assert_eq!(resp.status().as_u16(), 200);
    // Back from the URL push to the strategy that served before it.
    assert_eq!(
        cp.get_json("/v1/pools").await[0]["strategy"]["sha256"],
        serving
    );

    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.expect("load task");
    }
    let failed = failed.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        ok.load(Ordering::SeqCst),
        failed.first()
    );
    drop(envoy);
}
