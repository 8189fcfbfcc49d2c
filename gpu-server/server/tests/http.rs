//! The HTTP API end to end on a real socket with a tiny random-weight model: both endpoints,
//! streaming and not, usage with cached tokens, residency on the debug endpoint and
//! /metrics, and every bad-input case with the server still serving afterwards.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu_server_engine::EngineConfig;
use kvmesh_gpu_server_model::tiny::{TinySpec, write_gguf};
use kvmesh_gpu_server_server::{AppState, REPLICA_HEADER, ServerConfig, serve, serve_as};
use kvmesh_plugins_sdk::chunk;
use serde_json::{Value, json};

const MODEL: &str = "tiny";

struct Server {
    base: String,
    state: Arc<AppState>,
    http: reqwest::Client,
}

async fn start(engine: EngineConfig) -> Server {
    start_as(engine, None).await
}

/// A server answering as replica `id` (`None`: its address, the default).
async fn start_as(engine: EngineConfig, id: Option<&'static str>) -> Server {
    let p = std::env::temp_dir().join(format!("kvmesh-http-{}.gguf", std::process::id()));
    if !p.exists() {
        // Tests run in parallel; write_gguf renames a whole file into place.
        write_gguf(&p, &TinySpec::default()).unwrap();
    }
    let cfg = ServerConfig {
        model_name: MODEL.into(),
        chunk_bytes: 256,
        max_tokens_default: 16,
        engine,
        kv: kvmesh_gpu_server_server::KvTiers::default(),
    };
    let state = AppState::load(&p, &cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    match id {
        Some(id) => tokio::spawn(serve_as(listener, state.clone(), Some(id))),
        None => tokio::spawn(serve(listener, state.clone())),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server never became healthy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Server { base, state, http }
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The data lines of an SSE response.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_names_the_replica_that_answered() {
    let s = start_as(EngineConfig::default(), Some("replica-7")).await;
    let replica = |r: &reqwest::Response| {
        r.headers()
            .get(REPLICA_HEADER)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let url = format!("{}/v1/chat/completions", s.base);
    let chat = |stream: bool| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 2, "stream": stream})
    };
    for stream in [false, true] {
        let r = s.http.post(&url).json(&chat(stream)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(replica(&r).as_deref(), Some("replica-7"), "stream {stream}");
    }
    // Errors and the other routes too: where a 400 came from matters as much.
    let bad = s.http.post(&url).json(&json!({"model": "nope"})).send();
    let r = bad.await.unwrap();
    assert_eq!(
        (r.status().as_u16(), replica(&r).as_deref()),
        (400, Some("replica-7"))
    );
    for path in ["/health", "/metrics", "/v1/models", "/no-such-route"] {
        let r = s
            .http
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(replica(&r).as_deref(), Some("replica-7"), "{path}");
    }
    // Without an id, the replica is its address, as the reporter defaults it.
    let d = start(EngineConfig::default()).await;
    let r = d
        .http
        .get(format!("{}/health", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        replica(&r),
        d.base.strip_prefix("http://").map(str::to_owned)
    );
}

fn long_prompt() -> String {
    (0..70).map(|i| format!("word{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_usage_cache_and_residency() {
    let s = start(EngineConfig::default()).await;
    let prompt = long_prompt(); // 480+ bytes: one full 256-byte chunk (two once it passes 512)
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (st, a) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(a["usage"]["completion_tokens"], 5);
    assert_eq!(a["usage"]["prompt_tokens"], prompt.len()); // byte-level tokenizer
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, b) = s.post("/v1/completions", body).await;
    assert_eq!(
        b["choices"][0]["text"], a["choices"][0]["text"],
        "greedy is deterministic"
    );
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Every full 16-token block is reused; a block-aligned prompt (this one: 480 tokens) is
    // cached whole, and only its last token runs again for its logits.
    let n = prompt.len();
    let want_cached = if n.is_multiple_of(16) {
        n - 1
    } else {
        n / 16 * 16
    };
    assert_eq!(cached as usize, want_cached);
    // Residency: every full 256-byte chunk of the prompt is resident and reported.
    let want: Vec<String> = chunk::chunk_hashes(MODEL, prompt.as_bytes(), 256)
        .iter()
        .map(|h| format!("{h:016x}"))
        .collect();
    assert!(!want.is_empty());
    let dbg: Value = serde_json::from_str(&s.get("/debug/cache").await).unwrap();
    let have: Vec<String> = serde_json::from_value(dbg["resident_chunks"].clone()).unwrap();
    assert_eq!(have, {
        let mut w = want.clone();
        w.sort();
        w
    });
    let metrics = s.get("/metrics").await;
    assert!(
        metrics.contains(&format!("kvmesh_resident_chunks {}", want.len())),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("kvmesh_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("kvmesh_cached_prompt_tokens_total {cached}")),
        "{metrics}"
    );
    // One request after the other: neither waited for the other's prefill.
    assert!(metrics.contains("kvmesh_prefix_waits_total 0"), "{metrics}");
    // Both requests generated, so both have a time to first token (the dashboard's panel).
    assert!(
        metrics.contains("kvmesh_time_to_first_token_seconds_count 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_matches_non_stream() {
    let s = start(EngineConfig::default()).await;
    let msgs = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]);
    let body = json!({"model": MODEL, "messages": msgs, "max_completion_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (st, whole) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let lines = s.stream("/v1/chat/completions", sbody).await;
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| &ch["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert!(
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    // Completions stream too.
    let lines = s.stream("/v1/completions", json!({"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": true, "ignore_eos": true})).await;
    assert_eq!(lines.last().unwrap(), "[DONE]");
    assert!(s.get("/v1/models").await.contains("\"id\":\"tiny\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let s = start(EngineConfig::default()).await;
    let body = json!({"model": MODEL, "prompt": "xyz", "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let (_, full) = s.post("/v1/completions", body.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at the first occurrence of some two-character piece of the greedy text.
    let cut = text.char_indices().nth(5).map(|(i, _)| i).unwrap_or(0);
    let stop: String = text[cut..].chars().take(2).collect();
    let mut b = body;
    b["stop"] = json!([stop.clone()]);
    let (_, r) = s.post("/v1/completions", b).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let want = &text[..text.find(&stop).unwrap()];
    assert_eq!(r["choices"][0]["text"], want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let s = start(EngineConfig::default()).await;
    let err = |v: &Value| v["error"]["type"].as_str().unwrap_or_default().to_string();
    let (st, v) = s.post_raw("/v1/completions", "{not json").await;
    assert_eq!((st, err(&v).as_str()), (400, "invalid_request_error"));
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
    let (st, v) = s
        .post("/v1/completions", json!({"model": "nope", "prompt": "x"}))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("model_not_found"))
    );
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x".repeat(3000)}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    for (field, value) in [
        ("temperature", json!(7)),
        ("top_p", json!(0)),
        ("max_tokens", json!(0)),
        ("top_k", json!("a")),
        ("stop", json!([1])),
    ] {
        let mut b = json!({"model": MODEL, "prompt": "x"});
        b[field] = value;
        let (st, v) = s.post("/v1/completions", b).await;
        assert_eq!(st, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field);
    }
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(2)),
        ("tools", json!([{"type": "function"}])),
    ] {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        b[field] = value;
        let (st, v) = s.post("/v1/chat/completions", b).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("unsupported_parameter")),
            "{field}"
        );
        assert!(v["error"]["message"].as_str().unwrap().contains(field));
    }
    let (st, _) = s
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": []}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["a", "b"]}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "still up", "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_with_retry_after_and_disconnect_cancels() {
    let s = start(EngineConfig {
        max_running: 1,
        max_waiting: 1,
        ..EngineConfig::default()
    })
    .await;
    // A long stream occupies the only running slot.
    let mut busy = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": true, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert!(busy.chunk().await.unwrap().is_some());
    // The next request waits in the queue...
    let queued = {
        let (http, base) = (s.http.clone(), s.base.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/v1/completions"))
                .json(&json!({"model": MODEL, "prompt": "b", "max_tokens": 2}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.state.engine.status().load.waiting < 1 {
        assert!(Instant::now() < deadline, "second request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and the one after is refused.
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": MODEL, "prompt": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // Dropping the stream cancels it; the queued request then runs.
    drop(busy);
    assert_eq!(queued.await.unwrap().unwrap(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.state.engine.status().cache.in_use != 0 || s.state.engine.status().cancelled != 1 {
        assert!(
            Instant::now() < deadline,
            "cancelled stream kept its blocks"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
