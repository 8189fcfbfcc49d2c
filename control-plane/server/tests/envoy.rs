//! Whole control plane against real Envoy on 127.0.0.1: Envoy starts empty
//! and gets everything by ADS; replicas come and go through the ReplicaState
//! stream; a control-plane crash under load fails no request.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use kvmesh_control_plane_api::grpc::replica_state_client::ReplicaStateClient;
use kvmesh_plugins_sdk::proto::{
    ReplicaReport, ResidencyDelta, ResidencySnapshot, Tier, TierChunks, control_message,
    replica_report::Event,
};
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(30);

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[test]
fn bootstrap_passes_envoy_validate() {
    let Some(envoy) = envoy_bin("bootstrap_passes_envoy_validate") else {
        return;
    };
    let root = repo_root();
    let dir = tempdir("validate");
    // The pump module must exist for validation; an empty stand-in is enough
    // when it was not built (validation does not start the VM).
    let template =
        std::fs::read_to_string(root.join("envoy/bootstrap-dynamic.yaml")).expect("bootstrap");
    let pump = root.join("target/plugins/state-pump.wasm");
    let pump = if pump.exists() {
        pump
    } else {
        let p = dir.join("state-pump.wasm");
        std::fs::write(&p, b"\0asm\x01\0\0\0").expect("stand-in");
        p
    };
    let config = dir.join("bootstrap.yaml");
    std::fs::write(
        &config,
        template.replace("target/plugins/state-pump.wasm", &pump.to_string_lossy()),
    )
    .expect("write");
    let out = std::process::Command::new(envoy)
        .args(["--mode", "validate", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy");
    assert!(
        out.status.success(),
        "envoy rejected envoy/bootstrap-dynamic.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_starts_empty_and_follows_replicas() {
    let Some(bin) = envoy_bin("envoy_starts_empty_and_follows_replicas") else {
        return;
    };
    let dir = tempdir("follow");
    let listener = free_port();
    let yaml = cp_yaml(
        0,
        listener,
        &dir.join("store"),
        "warmup_ms: 0\nreplica_silence_ms: 600",
        "",
    );
    let cp = ControlPlane::start(&dir, &yaml);
    let envoy = Envoy::start(&bin, &dir, cp.grpc, None);
    let client = reqwest::Client::new();

    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let ra = a.reporter(cp.grpc);
    let rb = b.reporter(cp.grpc);
    eventually("traffic to a and b", WAIT, || async {
        (seen(&client, listener, 20).await == set(&["a", "b"])).then_some(())
    })
    .await;
    // The listener, route and cluster all came from the control plane.
    let dump = envoy.admin_get("/config_dump").await;
    assert!(
        dump.contains("kvmesh/pool-a"),
        "dynamic resources missing from config_dump"
    );

    // b stops (its stream ends); after the silence timeout it leaves EDS.
    drop(rb);
    eventually("b dropped", WAIT, || async {
        (seen(&client, listener, 20).await == set(&["a"])).then_some(())
    })
    .await;

    // A new replica is followed by traffic.
    let c = Backend::start("c").await;
    let _rc = c.reporter(cp.grpc);
    eventually("traffic to c", WAIT, || async {
        (seen(&client, listener, 20).await == set(&["a", "c"])).then_some(())
    })
    .await;
    drop(ra);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_replica_is_dropped_and_malformed_reports_change_nothing() {
    let Some(bin) = envoy_bin("silent_replica_is_dropped_and_malformed_reports_change_nothing")
    else {
        return;
    };
    let dir = tempdir("silent");
    let listener = free_port();
    let yaml = cp_yaml(
        0,
        listener,
        &dir.join("store"),
        "warmup_ms: 0\nreplica_silence_ms: 800",
        "",
    );
    let cp = ControlPlane::start(&dir, &yaml);
    let envoy = Envoy::start(&bin, &dir, cp.grpc, None);
    let backend = Backend::start("quiet").await;

    // A raw client: registers, sends a snapshot, then misbehaves.
    let mut client = ReplicaStateClient::connect(format!("http://{}", cp.grpc))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<ReplicaReport>(16);
    let mut inbound = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("report")
        .into_inner();
    let send = |e: Option<Event>| {
        let tx = tx.clone();
        async move { tx.send(ReplicaReport { event: e }).await.expect("send") }
    };
    let register = kvmesh_plugins_sdk::proto::Register {
        replica_id: "quiet".into(),
        address: backend.addr.to_string(),
        model: MODEL.into(),
        block_tokens: 16,
        chunk_bytes: 256,
        capacity: vec![],
    };
    send(Some(Event::Register(register))).await;
    let device = |c: &[u64]| {
        vec![TierChunks {
            tier: Tier::Device as i32,
            chunks: c.to_vec(),
        }]
    };
    send(Some(Event::Snapshot(ResidencySnapshot {
        seq: 1,
        resident: device(&[1, 2, 3]),
    })))
    .await;
    let first = inbound.next().await.expect("answer").expect("ok");
    assert!(matches!(
        first.msg,
        Some(control_message::Msg::Registered(_))
    ));
    eventually("quiet in EDS", WAIT, || async {
        envoy
            .admin_get("/clusters")
            .await
            .contains(&backend.addr.to_string())
            .then_some(())
    })
    .await;

    // Malformed: no event; a bad tier. Each is refused with a reason.
    send(None).await;
    send(Some(Event::Delta(ResidencyDelta {
        seq: 2,
        added: vec![TierChunks {
            tier: 99,
            chunks: vec![4],
        }],
        removed: device(&[1]),
    })))
    .await;
    for expected in ["empty report", "invalid tier value 99"] {
        let msg = inbound.next().await.expect("answer").expect("ok");
        match msg.msg {
            Some(control_message::Msg::Rejected(r)) => {
                assert!(r.reason.contains(expected), "{r:?}")
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    // Nothing else changed: residency intact, and seq 2 is still next.
    let replicas = cp.replicas().await;
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["resident_chunks"]["1"], 3);
    assert_eq!(replicas[0]["rejected_reports"], 2);
    send(Some(Event::Delta(ResidencyDelta {
        seq: 2,
        added: device(&[4]),
        removed: vec![],
    })))
    .await;
    eventually("delta applied", WAIT, || async {
        (cp.replicas().await.first()?["resident_chunks"]["1"] == 4).then_some(())
    })
    .await;
    assert!(
        cp.metrics()
            .await
            .contains("kvmesh_cp_state_rejected_total 2")
    );

    // Now it stays silent with the stream open: dropped from the registry and EDS.
    eventually("quiet dropped", WAIT, || async {
        cp.replicas().await.is_empty().then_some(())
    })
    .await;
    eventually("quiet out of EDS", WAIT, || async {
        (!envoy
            .admin_get("/clusters")
            .await
            .contains(&backend.addr.to_string()))
        .then_some(())
    })
    .await;
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_under_load_fails_nothing_and_resyncs() {
    let Some(bin) = envoy_bin("control_plane_restart_under_load_fails_nothing_and_resyncs") else {
        return;
    };
    let dir = tempdir("restart");
    let listener = free_port();
    let grpc_port = free_port();
    let yaml = cp_yaml(
        grpc_port,
        listener,
        &dir.join("store"),
        "warmup_ms: 1500\nreplica_silence_ms: 3000",
        "",
    );
    let mut cp = ControlPlane::start(&dir, &yaml);
    let _envoy = Envoy::start(&bin, &dir, cp.grpc, None);
    let client = reqwest::Client::new();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let ra = a.reporter(cp.grpc);
    let rb = b.reporter(cp.grpc);
    let device = |c: std::ops::Range<u64>| {
        vec![TierChunks {
            tier: Tier::Device as i32,
            chunks: c.collect(),
        }]
    };
    ra.residency(device(0..100), vec![]);
    rb.residency(device(1000..1050), vec![]);
    eventually("traffic to a and b", WAIT, || async {
        (seen(&client, listener, 20).await == set(&["a", "b"])).then_some(())
    })
    .await;

    // Continuous load while the control plane is killed and restarted.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, client) = (stop.clone(), ok.clone(), failed.clone(), client.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match via_envoy(&client, listener).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        failed.lock().expect("lock").push(e);
                        0
                    }
                };
            }
        }));
    }
    let before = ok.load(Ordering::SeqCst);
    eventually("load flowing", WAIT, || async {
        (ok.load(Ordering::SeqCst) > before + 50).then_some(())
    })
    .await;
    cp.kill();
    // Changes while the control plane is down arrive with the resync.
    ra.residency(device(100..110), vec![]);
    let during = ok.load(Ordering::SeqCst);
    eventually("load while down", WAIT, || async {
        (ok.load(Ordering::SeqCst) > during + 50).then_some(())
    })
    .await;
    let cp = ControlPlane::start_with(cp.config_path.clone());
    assert_eq!(cp.grpc.port(), grpc_port);
    eventually("replicas resynced", WAIT, || async {
        let r = cp.replicas().await;
        let count = |id: &str| {
            r.iter()
                .find(|x| x["id"] == id)
                .map(|x| x["resident_chunks"]["1"].clone())
        };
        (count("a") == Some(110.into()) && count("b") == Some(50.into())).then_some(())
    })
    .await;
    eventually("readyz", WAIT, || async {
        let r = reqwest::get(cp.url("/readyz")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let after = ok.load(Ordering::SeqCst);
    eventually("load after restart", WAIT, || async {
        (ok.load(Ordering::SeqCst) > after + 100).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.expect("load task");
    }
    let failed = failed.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "{} requests failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    // Both replicas still serve after the restart.
    assert_eq!(seen(&client, listener, 20).await, set(&["a", "b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_pump_brings_replica_state_to_every_worker_and_resyncs() {
    let test = "state_pump_brings_replica_state_to_every_worker_and_resyncs";
    let Some(bin) = envoy_bin(test) else { return };
    let (Some(pump), Some(probe_wasm)) = (plugin(test, "state-pump"), plugin(test, "state-probe"))
    else {
        return;
    };
    let dir = tempdir("pump");
    let listener = free_port();
    let grpc_port = free_port();
    let probe_line = format!("    probe_module: {}\n", probe_wasm.display());
    let yaml = cp_yaml(
        grpc_port,
        listener,
        &dir.join("store"),
        "warmup_ms: 500\nreplica_silence_ms: 3000",
        &probe_line,
    );
    let mut cp = ControlPlane::start(&dir, &yaml);
    let envoy = Envoy::start(&bin, &dir, cp.grpc, Some(&pump));
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let ra = a.reporter(cp.grpc);
    let rb = b.reporter(cp.grpc);
    let device = |c: std::ops::Range<u64>| {
        vec![TierChunks {
            tier: Tier::Device as i32,
            chunks: c.collect(),
        }]
    };
    ra.residency(device(0..300), vec![]);
    rb.residency(device(1000..1100), vec![]);
    eventually("listener up", WAIT, || async {
        reqwest::get(format!("http://127.0.0.1:{listener}/kvmesh/state/pool-a"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let workers = worker_clients(listener, "pool-a", 2).await;
    eventually(
        "every worker sees both replicas and their chunks",
        WAIT,
        || {
            all_see(&workers, listener, |v| {
                v["replicas"].as_array().map_or(0, Vec::len) == 2 && v["indexed_chunks"] == 400
            })
        },
    )
    .await;

    // A load change and a residency change reach every worker.
    ra.load(kvmesh_plugins_sdk::proto::Load {
        waiting: 42,
        ..Default::default()
    });
    rb.residency(device(1100..1105), device(1000..1001));
    eventually("load and residency change in every worker", WAIT, || {
        all_see(&workers, listener, |v| {
            replica_field(v, "a", "waiting") == Some(42) && v["indexed_chunks"] == 404
        })
    })
    .await;
    let stats = envoy.admin_get("/stats?filter=kvmesh_pump").await;
    let acks = stats
        .lines()
        .find(|l| l.contains("kvmesh_pump.acks"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(acks > 0, "the pump ACKed nothing: {stats}");
    assert!(
        !stats
            .lines()
            .any(|l| l.contains("kvmesh_pump.nacks") && !l.ends_with(" 0")),
        "{stats}"
    );

    // The control plane restarts; changes made meanwhile arrive after the resync,
    // and the workers never lose the replicas in between.
    cp.kill();
    ra.residency(device(300..310), vec![]);
    let cp = ControlPlane::start_with(cp.config_path.clone());
    assert_eq!(cp.grpc.port(), grpc_port);
    eventually("resynced state in every worker", WAIT, || {
        all_see(&workers, listener, |v| {
            v["replicas"].as_array().map_or(0, Vec::len) == 2 && v["indexed_chunks"] == 414
        })
    })
    .await;
    drop(envoy);
}

/// `Some(())` when every worker's probe view passes `check`.
async fn all_see(
    workers: &[reqwest::Client],
    listener: u16,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Option<()> {
    for w in workers {
        if !check(&probe(w, listener, "pool-a").await) {
            return None;
        }
    }
    Some(())
}

/// A model-server stand-in whose answer takes 3 s: `/stream` sends a piece every 300 ms,
/// `/silent` sends nothing until the end.
async fn slow_backend(id: &str) -> (Backend, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route(
            "/stream",
            axum::routing::post(|| async {
                let pieces = futures::stream::unfold(0u32, |i| async move {
                    if i == 10 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let piece = bytes::Bytes::from(format!("data: piece {i}\n\n"));
                    Some((Ok::<_, std::convert::Infallible>(piece), i + 1))
                });
                axum::body::Body::from_stream(pieces)
            }),
        )
        .route(
            "/silent",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (Backend::fake(id, addr), task)
}

/// A control plane with one pool whose timeout is 1 s, no replica yet, and Envoy following
/// it; returns them and the pool's listener port.
fn pool_with_a_1s_timeout(bin: &std::path::Path, tag: &str) -> (ControlPlane, Envoy, u16) {
    let dir = tempdir(tag);
    let listener = free_port();
    let yaml = cp_yaml(
        0,
        listener,
        &dir.join("store"),
        "warmup_ms: 0",
        "    timeout_ms: 1000\n",
    );
    let cp = ControlPlane::start(&dir, &yaml);
    let envoy = Envoy::start(bin, &dir, cp.grpc, None);
    (cp, envoy, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_pool_timeout_while_it_sends_and_an_idle_one_is_cut() {
    let Some(bin) =
        envoy_bin("a_stream_outlives_the_pool_timeout_while_it_sends_and_an_idle_one_is_cut")
    else {
        return;
    };
    // A 1 s pool timeout against answers that take 3 s.
    let (cp, _envoy, listener) = pool_with_a_1s_timeout(&bin, "idle");
    let (backend, _task) = slow_backend("slow").await;
    let _reporter = backend.reporter(cp.grpc);
    let client = reqwest::Client::new();
    let post = |path: &'static str| {
        client
            .post(format!("http://127.0.0.1:{listener}{path}"))
            .body("{}")
            .send()
    };
    // Routed once the replica is in EDS (the silent path would take 3 s a try).
    eventually("a route to the replica", WAIT, || async {
        let r = post("/stream").await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // Ten pieces over 3 s, each within the timeout of the last: all of them arrive.
    let r = post("/stream").await.expect("stream");
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("whole stream, not cut at 1 s");
    let pieces: Vec<&str> = body.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(pieces.len(), 10, "{body:?}");
    assert_eq!(pieces.last(), Some(&"data: piece 9"));
    // Nothing for 3 s: cut by the idle timeout, a 504 from Envoy in the OpenAI error shape.
    let r = post("/silent").await.expect("silent");
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body = r.text().await.expect("body");
    let message = openai_error(&body, "server_error", Some("upstream_timeout"));
    assert_eq!(
        message,
        "the model server sent nothing within the gateway's timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_no_replica_answers_503_in_the_openai_shape() {
    let Some(bin) = envoy_bin("a_pool_with_no_replica_answers_503_in_the_openai_shape") else {
        return;
    };
    let (_cp, _envoy, listener) = pool_with_a_1s_timeout(&bin, "no-replica");
    let client = reqwest::Client::new();
    // No replica has registered: Envoy answers 503 itself, once its listener is up.
    let (status, body) = eventually("the listener answers", WAIT, || async {
        let r = client
            .post(format!("http://127.0.0.1:{listener}/v1/chat/completions"))
            .body("{}")
            .send()
            .await
            .ok()?;
        Some((r.status().as_u16(), r.text().await.ok()?))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let message = openai_error(&body, "server_error", Some("upstream_unavailable"));
    assert_eq!(message, "no healthy upstream");
}
