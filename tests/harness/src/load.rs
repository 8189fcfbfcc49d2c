//! One OpenAI request, timed: sends a `/v1/chat/completions` or
//! `/v1/completions` body (streaming with usage, or not) and records what a
//! client sees: status, when the response headers came, time to the first
//! token, end-to-end latency, tokens and cached tokens.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

/// What one request gave.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Sent at, from the run's start.
    pub sent: Duration,
    /// Response headers came at (from the run's start); `None` if never.
    pub headers: Option<Duration>,
    /// HTTP status (0: no response).
    pub status: u16,
    /// The gateway's `x-kvmesh-decision` header (replica, reason), when the
    /// response came through kvmesh.
    pub decision: Option<String>,
    /// The replica that answered (its `x-kvmesh-replica` header), through any
    /// router.
    pub replica: Option<String>,
    /// Whether it completed: 2xx and, when streaming, `data: [DONE]` seen.
    pub ok: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Time to the first generated text (streaming only).
    pub ttft: Option<Duration>,
    /// Send to last byte.
    pub e2e: Duration,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// The generated text.
    pub text: String,
}

impl Outcome {
    /// Decode rate after the first token, tokens per second.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let ttft = self.ttft?;
        let rest = self.e2e.checked_sub(ttft)?.as_secs_f64();
        (self.completion_tokens > 1 && rest > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / rest)
    }
}

fn usage(o: &mut Outcome, u: &Value) {
    o.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
    o.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
    o.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
}

/// Sends `body` to `base` + `path`; `stream` adds `stream: true` and asks for
/// usage in the last chunk. `start` is the run's clock.
pub async fn send(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    mut body: Value,
    stream: bool,
    start: Instant,
) -> Outcome {
    if stream {
        body["stream"] = Value::Bool(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let t0 = Instant::now();
    let mut o = Outcome {
        sent: t0 - start,
        ..Outcome::default()
    };
    let resp = client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("send: {e}"));
            o.e2e = t0.elapsed();
            return o;
        }
    };
    o.headers = Some(start.elapsed());
    o.status = resp.status().as_u16();
    o.decision = resp
        .headers()
        .get("x-kvmesh-decision")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    o.replica = resp
        .headers()
        .get("x-kvmesh-replica")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if !resp.status().is_success() {
        o.error = Some(resp.text().await.unwrap_or_default());
        o.e2e = t0.elapsed();
        return o;
    }
    if !stream {
        match resp.json::<Value>().await {
            Ok(v) => {
                usage(&mut o, &v["usage"]);
                let c = &v["choices"][0];
                o.text = c["message"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                o.ok = true;
            }
            Err(e) => o.error = Some(format!("body: {e}")),
        }
        o.e2e = t0.elapsed();
        return o;
    }
    let mut bytes = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut done = false;
    'read: while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                o.error = Some(format!("stream: {e}"));
                break;
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    break 'read;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    o.error = Some(format!("bad event {data:?}"));
                    continue;
                };
                if v.get("error").is_some() {
                    o.error = Some(data.to_owned());
                }
                if v["usage"].is_object() {
                    usage(&mut o, &v["usage"]);
                }
                let c = &v["choices"][0];
                let piece = c["delta"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap_or_default();
                if o.ttft.is_none() && (!piece.is_empty() || c["finish_reason"].is_string()) {
                    o.ttft = Some(t0.elapsed());
                }
                o.text.push_str(piece);
            }
        }
    }
    o.e2e = t0.elapsed();
    o.ok = done && o.error.is_none();
    if !done && o.error.is_none() {
        o.error = Some("stream ended before [DONE]".to_owned());
    }
    o
}
