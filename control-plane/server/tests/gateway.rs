//! Pools from Kubernetes through real Envoy: the pools that real endpoint resources and
//! EndpointSlices describe (the controller's `pools()`, as the watcher computes them) share
//! one gateway listener, each under `/<namespace>/<name>`, each with its own routing filter
//! switched on by its route only; a pool added or removed at run time appears or goes while
//! the others keep serving. (The watch itself is tested against a mocked API server in
//! `kube_pools`.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kvmesh_control_plane_controller::crd::InferenceEndpointConfig;
use kvmesh_control_plane_server::config::PoolSpec;
use kvmesh_control_plane_server::kube_pools::pool_specs;
use kvmesh_control_plane_server::{App, Config, serve_with};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A model server stand-in that answers `<id> <path it was asked for>`.
async fn path_backend(id: &str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let id = id.to_owned();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let id = id.clone();
        async move { format!("{id} {}", uri.path()) }
    });
    (
        addr,
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
    )
}

fn endpoint(ns: &str, name: &str, strategy: &str) -> Arc<InferenceEndpointConfig> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "kvmesh.io/v1alpha1", "kind": "InferenceEndpointConfig",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "modelName": format!("model-{name}"),
                "instanceType": "m7i.2xlarge",
                "modelSourceConfig": {"modelSourceType": "pvc", "pvc": {"claimName": "w"}},
                "worker": {"image": "img", "modelInvocationPort": {"containerPort": 8000}},
                "intelligentRoutingSpec": {"routingStrategy": strategy}
            }
        }))
        .expect("resource"),
    )
}

fn slice(ns: &str, service: &str, addr: std::net::SocketAddr) -> Arc<EndpointSlice> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-1"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]
        }))
        .expect("slice"),
    )
}

/// Status, body and decision header of one completion request through the gateway.
async fn ask(
    client: &reqwest::Client,
    gateway: u16,
    path: &str,
    model: &str,
) -> Result<(u16, String, Option<String>), String> {
    let resp = client
        .post(format!("http://127.0.0.1:{gateway}{path}"))
        .header("content-type", "application/json")
        .body(json!({"model": model, "prompt": "hello gateway", "max_tokens": 1}).to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let decision = resp
        .headers()
        .get("x-kvmesh-decision")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((
        status,
        resp.text().await.map_err(|e| e.to_string())?,
        decision,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pools_share_the_gateway_by_path_and_come_and_go() {
    const TEST: &str = "kubernetes_pools_share_the_gateway_by_path_and_come_and_go";
    let Some(bin) = envoy_bin(TEST) else {
        return;
    };
    let (Some(prefix), Some(rr)) = (plugin(TEST, "prefix-aware"), plugin(TEST, "round-robin"))
    else {
        return;
    };
    let dir = tempdir("gateway");
    let gateway = free_port();
    let yaml = format!(
        "grpc: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwarmup_ms: 0\nmodule_store: {}\n\
         kubernetes:\n  listener: 127.0.0.1:{gateway}\n  strategies:\n    \
         prefix-aware: {}\n    round-robin: {}\n",
        dir.join("store").display(),
        prefix.display(),
        rr.display()
    );
    let config: Config = serde_yaml::from_str(&yaml).expect("config");
    config.validate().expect("valid config");
    let k = config.kubernetes.clone().expect("kubernetes source");
    let (tx, rx) = tokio::sync::oneshot::channel::<(std::net::SocketAddr, Arc<App>)>();
    tokio::spawn(serve_with(config, None, move |bound, app| {
        let _ = tx.send((bound.grpc, app));
    }));
    let (grpc, app) = rx.await.expect("control plane bound");
    let _envoy = Envoy::start(&bin, &dir, grpc, None);
    let client = reqwest::Client::new();

    let (a, _ta) = path_backend("a").await;
    let (b, _tb) = path_backend("b").await;
    let (c, _tc) = path_backend("c").await;
    // Three resources: two with a module for their strategy, one (kv-aware) without, which is
    // served by Envoy's own balancing.
    let endpoints = [
        endpoint("team", "chat", "prefixaware"),
        endpoint("team", "batch", "roundrobin"),
        endpoint("lab", "kv", "kvaware"),
    ];
    let slices = [
        slice("team", "chat", a),
        slice("team", "batch", b),
        slice("lab", "kv", c),
    ];
    let specs = |n: usize| -> Vec<PoolSpec> {
        pool_specs(&endpoints[..n], &[], &BTreeMap::new(), &slices, &k)
    };
    let left_out = app.set_dynamic_pools(specs(3)).await;
    assert!(left_out.is_empty(), "left out: {left_out:?}");

    // Each path reaches its own pool, with the prefix stripped and its own filter (or none).
    // A new pool's route can reach Envoy before the listener holding its filter has warmed
    // (the listener waits for the filter's ECDS config; the route table is shared): for that
    // moment its requests are balanced by Envoy alone. So wait for the filter, then check.
    let want = [
        (
            "/team/chat/v1/completions",
            "model-chat",
            "a /v1/completions",
            Some("prefix-aware"),
        ),
        (
            "/team/batch/v1/chat/completions",
            "model-batch",
            "b /v1/chat/completions",
            Some("round-robin"),
        ),
        (
            "/lab/kv/v1/completions",
            "model-kv",
            "c /v1/completions",
            None,
        ),
    ];
    for (path, model, body, strategy) in want {
        let ran = |d: Option<&str>| {
            d.and_then(|d| d.split("; ").find_map(|f| f.strip_prefix("strategy=")))
                .map(str::to_owned)
        };
        let got = eventually(&format!("{path} served by its filter"), WAIT, || async {
            match ask(&client, gateway, path, model).await {
                Ok((200, body, decision)) if ran(decision.as_deref()).as_deref() == strategy => {
                    Some(body)
                }
                _ => None,
            }
        })
        .await;
        assert_eq!(got, body, "{path}");
    }
    let (status, body, _) = ask(&client, gateway, "/nope/x/v1/completions", "m")
        .await
        .expect("answer");
    assert_eq!(status, 404, "a path of no pool");
    openai_error(&body, "invalid_request_error", Some("not_found"));

    // Remove `lab/kv` and `team/batch` while `team/chat` is under load: the others go,
    // `team/chat` fails nothing. (A fresh connection per request: a listener update drains
    // kept-alive connections, and a client racing a close is a client matter.)
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let fresh = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            while !stop.load(Ordering::Relaxed) {
                match ask(&fresh, gateway, "/team/chat/v1/completions", "model-chat").await {
                    Ok((200, body, _)) if body == "a /v1/completions" => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    other => {
                        eprintln!("team/chat during the change: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    eventually("load running", WAIT, || async {
        (ok.load(Ordering::Relaxed) >= 5).then_some(())
    })
    .await;
    app.set_dynamic_pools(specs(1)).await;
    for path in ["/team/batch/v1/chat/completions", "/lab/kv/v1/completions"] {
        eventually(&format!("{path} gone"), WAIT, || async {
            matches!(ask(&client, gateway, path, "m").await, Ok((404, _, _))).then_some(())
        })
        .await;
    }
    let before = ok.load(Ordering::Relaxed);
    eventually("load after the change", WAIT, || async {
        (ok.load(Ordering::Relaxed) >= before + 5).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "team/chat failed requests while other pools changed ({} ok)",
        ok.load(Ordering::Relaxed)
    );

    // A pool comes back with its resource.
    app.set_dynamic_pools(specs(2)).await;
    eventually("team/batch back", WAIT, || async {
        matches!(
            ask(&client, gateway, "/team/batch/v1/completions", "model-batch").await,
            Ok((200, body, _)) if body == "b /v1/completions"
        )
        .then_some(())
    })
    .await;
}
