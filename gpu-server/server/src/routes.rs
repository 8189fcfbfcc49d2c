//! The HTTP handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kvmesh_gpu_server_engine::{Request, SubmitError};
use kvmesh_gpu_server_model::ChatMessage;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::api::{ChatRequest, CompletionRequest, Gen, chat_messages, prompt_text};
use crate::error::ApiError;
use crate::generate::{Generation, Piece};
use crate::metrics::RequestLabels;
use crate::residency::{Message, chat_chunks, completion_chunks};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn count(state: &AppState, endpoint: &str, status: StatusCode) {
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: endpoint.to_string(),
            status: status.as_u16(),
        })
        .inc();
}

pub(crate) async fn health() -> &'static str {
    "ok"
}

pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "kvmesh",
            "max_model_len": state.engine.context_length(),
        }],
    }))
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The cache state as JSON: load, block counts, resident chunk hashes (hex), and per tier its
/// counters, measured costs, resident chunks and blocks (`slot`, block hash).
pub(crate) async fn debug_cache(State(state): State<Arc<AppState>>) -> Json<Value> {
    let contents = state.engine.tier_contents().await;
    let s = state.engine.status();
    let hex = |v: &[u64]| -> Vec<String> { v.iter().map(|c| format!("{c:016x}")).collect() };
    let tiers: Vec<Value> = s
        .tiers
        .iter()
        .map(|t| {
            let blocks: Vec<Value> = contents
                .iter()
                .find(|(tier, _)| *tier == t.tier)
                .map(|(_, b)| {
                    b.iter()
                        .map(|(slot, h)| json!({"slot": slot, "block": format!("{h:016x}")}))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "tier": t.tier,
                "enabled": t.enabled,
                "counters": t.counters,
                "bytes": t.bytes,
                "cost": t.cost,
                "resident_chunks": hex(&t.resident_chunks),
                "blocks": blocks,
            })
        })
        .collect();
    let chunks: Vec<String> = s
        .resident_chunks
        .iter()
        .map(|c| format!("{c:016x}"))
        .collect();
    Json(json!({
        "model": state.model_name,
        "chunk_bytes": state.chunk_bytes,
        "block_tokens": s.block_tokens,
        "load": s.load,
        "cache": s.cache,
        "residency_seq": s.residency_seq,
        "resident_chunks": chunks,
        "pool_bytes": s.pool_bytes,
        "pool_bytes_per_token": s.pool_bytes_per_token,
        "model_kv_bytes_per_token_f16": state.kv_bytes_per_token_f16,
        "steps": s.steps,
        "prompt_tokens": s.prompt_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "preemptions": s.preemptions,
        "prefix_waits": s.prefix_waits,
        "cancelled": s.cancelled,
        "tiers": tiers,
        "cost_model": s.cost,
        "disk": s.disk,
    }))
}

pub(crate) async fn fallback() -> ApiError {
    ApiError::not_found()
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))
}

pub(crate) async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = completions_inner(&state, &body).await;
    finish(&state, "/v1/completions", r)
}

pub(crate) async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let r = chat_inner(&state, &body).await;
    finish(&state, "/v1/chat/completions", r)
}

fn finish(state: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    count(state, endpoint, resp.status());
    resp
}

async fn completions_inner(state: &Arc<AppState>, body: &Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    let gen_ = req
        .common
        .check(&state.model_name, state.max_tokens_default)?;
    let prompt = prompt_text(&req.prompt)?;
    let toks = encode(state, &prompt)?;
    let ends: Vec<usize> = toks.iter().map(|t| t.1).collect();
    let chunks = completion_chunks(&state.model_name, state.chunk_bytes, &prompt, &ends);
    let ids = toks.into_iter().map(|t| t.0).collect();
    run(state.clone(), gen_, ids, chunks, false).await
}

async fn chat_inner(state: &Arc<AppState>, body: &Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    let gen_ = req
        .common
        .check(&state.model_name, state.max_tokens_default)?;
    let msgs = chat_messages(&req.messages)?;
    let chat: Vec<ChatMessage> = msgs
        .iter()
        .map(|(role, content)| ChatMessage {
            role: role.clone(),
            content: content.clone(),
        })
        .collect();
    let rendered = match &state.template {
        Some(t) => t
            .render(&chat)
            .map_err(|e| ApiError::invalid(format!("{e}"), Some("messages")))?,
        None => {
            return Err(ApiError::invalid(
                "this model has no chat template; use /v1/completions",
                None,
            ));
        }
    };
    let toks = encode(state, &rendered)?;
    let ends: Vec<usize> = toks.iter().map(|t| t.1).collect();
    let view: Vec<Message<'_>> = msgs
        .iter()
        .map(|(role, content)| Message { role, content })
        .collect();
    let chunks = chat_chunks(
        &state.model_name,
        state.chunk_bytes,
        &view,
        &rendered,
        &ends,
    );
    let ids = toks.into_iter().map(|t| t.0).collect();
    run(state.clone(), gen_, ids, chunks, true).await
}

fn encode(state: &AppState, text: &str) -> Result<Vec<(u32, usize)>, ApiError> {
    state
        .tokenizer
        .encode_with_ends(text)
        .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), None))
}

async fn run(
    state: Arc<AppState>,
    mut gen_: Gen,
    prompt: Vec<u32>,
    chunks: Vec<kvmesh_gpu_server_engine::ChunkEnd>,
    chat: bool,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let context = state.engine.context_length();
    let n = prompt.len();
    if n + 1 > context {
        return Err(ApiError::too_long(format!(
            "the prompt has {n} tokens; this model's context is {context} tokens"
        )));
    }
    gen_.params.max_tokens = gen_.params.max_tokens.min(context - n);
    let (tx, rx) = mpsc::unbounded_channel();
    state
        .engine
        .submit(Request {
            prompt,
            params: gen_.params.clone(),
            chunks,
            events: tx,
            logits: None,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(),
            SubmitError::TooLong { .. } | SubmitError::TooLarge { .. } => {
                ApiError::too_long(e.to_string())
            }
            SubmitError::EmptyPrompt => ApiError::invalid(e.to_string(), Some("prompt")),
            SubmitError::Stopped => ApiError::internal(e.to_string()),
        })?;
    let generation = Generation::new(
        rx,
        state.tokenizer.clone(),
        gen_.stop.clone(),
        n,
        Some((arrived, state.metrics.ttft.clone())),
    );
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    if gen_.stream {
        Ok(stream(state, gen_, generation, id, chat).into_response())
    } else {
        collect(&gen_, generation, id, chat).await
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": g.cached_tokens},
    })
}

async fn collect(
    gen_: &Gen,
    mut g: Generation,
    id: String,
    chat: bool,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut finish = "stop";
    while let Some(p) = g.next().await {
        match p? {
            Piece::Text(t) => text.push_str(&t),
            Piece::End(f) => finish = f,
        }
    }
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": null})
    } else {
        json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
    };
    Ok(Json(json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": now(),
        "model": gen_.model,
        "choices": [choice],
        "usage": usage(&g),
    }))
    .into_response())
}

fn stream(
    state: Arc<AppState>,
    gen_: Gen,
    mut g: Generation,
    id: String,
    chat: bool,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let created = now();
    let model = gen_.model.clone();
    let chunk = move |choice: Value, usage: Option<Value>| {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        if let Some(u) = usage {
            v["choices"] = json!([]);
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    tokio::spawn(async move {
        let _keep = state;
        let send = |e: SseEvent| {
            let tx = tx.clone();
            async move { tx.send(Ok(e)).await.is_ok() }
        };
        if chat && !send(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}), None)).await {
            return;
        }
        loop {
            let next = tokio::select! {
                n = g.next() => n,
                () = tx.closed() => return, // client gone: dropping `g` cancels the request
            };
            let Some(p) = next else { break };
            let ev = match p {
                Ok(Piece::Text(t)) => {
                    if chat {
                        chunk(
                            json!({"index": 0, "delta": {"content": t}, "finish_reason": null}),
                            None,
                        )
                    } else {
                        chunk(json!({"index": 0, "text": t, "finish_reason": null}), None)
                    }
                }
                Ok(Piece::End(f)) => {
                    if chat {
                        chunk(json!({"index": 0, "delta": {}, "finish_reason": f}), None)
                    } else {
                        chunk(json!({"index": 0, "text": "", "finish_reason": f}), None)
                    }
                }
                Err(e) => SseEvent::default().data(e.body().to_string()),
            };
            if !send(ev).await {
                return;
            }
        }
        if gen_.include_usage {
            let _ = send(chunk(Value::Null, Some(usage(&g)))).await;
        }
        let _ = send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
