//! OpenAI request bodies: parsing and validation into checked generation parameters.

use std::collections::HashMap;

use kvmesh_gpu_server_engine::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Fields of both endpoints that affect generation.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_k: Option<Value>,
    pub seed: Option<Value>,
    pub stop: Option<Value>,
    pub ignore_eos: Option<bool>,
    #[serde(flatten)]
    pub rest: HashMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

/// Checked generation settings.
#[derive(Debug, Clone)]
pub struct Gen {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub params: SamplingParams,
    pub stop: Vec<String>,
}

/// Parameters we know and do not implement: refused when set to anything but their default.
fn unsupported_set(name: &str, v: &Value) -> bool {
    match name {
        "n" | "best_of" => !(v.is_null() || v.as_u64() == Some(1)),
        "logprobs"
        | "top_logprobs"
        | "echo"
        | "logit_bias"
        | "suffix"
        | "tools"
        | "tool_choice"
        | "functions"
        | "function_call"
        | "parallel_tool_calls" => !(v.is_null() || v == &Value::Bool(false)),
        "presence_penalty" | "frequency_penalty" | "repetition_penalty" => {
            !(v.is_null()
                || v.as_f64() == Some(0.0)
                || (name == "repetition_penalty" && v.as_f64() == Some(1.0)))
        }
        "response_format" => {
            !(v.is_null() || v.get("type").and_then(Value::as_str) == Some("text"))
        }
        _ => false,
    }
}

fn number(v: &Option<Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("'{name}' must be a number"), Some(name))),
    }
}

fn integer(v: &Option<Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("'{name}' must be an integer"), Some(name))),
    }
}

impl Common {
    /// Validates everything but the prompt. `max_default` is used when no limit is given.
    pub fn check(&self, served: &str, max_default: usize) -> Result<Gen, ApiError> {
        let mut names: Vec<&String> = self.rest.keys().collect();
        names.sort();
        for name in names {
            if unsupported_set(name, &self.rest[name]) {
                return Err(ApiError::unsupported(name));
            }
        }
        let model = match &self.model {
            None => return Err(ApiError::invalid("'model' is required", Some("model"))),
            Some(m) if m != served => return Err(ApiError::model_not_found(m)),
            Some(m) => m.clone(),
        };
        let temperature = number(&self.temperature, "temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "'temperature' must be between 0 and 2",
                Some("temperature"),
            ));
        }
        let top_p = number(&self.top_p, "top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "'top_p' must be in (0, 1]",
                Some("top_p"),
            ));
        }
        let top_k = integer(&self.top_k, "top_k")?.unwrap_or(0);
        // -1 is the vLLM/SGLang spelling of "no limit".
        if top_k < -1 {
            return Err(ApiError::invalid(
                "'top_k' must be -1, 0 or positive",
                Some("top_k"),
            ));
        }
        let seed = integer(&self.seed, "seed")?.map(|s| s as u64);
        let (limit, limit_name) = match (&self.max_completion_tokens, &self.max_tokens) {
            (Some(v), _) if !v.is_null() => (
                integer(&self.max_completion_tokens, "max_completion_tokens")?,
                "max_completion_tokens",
            ),
            _ => (integer(&self.max_tokens, "max_tokens")?, "max_tokens"),
        };
        let max_tokens = match limit {
            None => max_default,
            Some(n) if n >= 1 => n as usize,
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("'{limit_name}' must be at least 1"),
                    Some(limit_name),
                ));
            }
        };
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                let v: Option<Vec<String>> =
                    a.iter().map(|x| x.as_str().map(str::to_string)).collect();
                v.ok_or_else(|| {
                    ApiError::invalid(
                        "'stop' must be a string or an array of strings",
                        Some("stop"),
                    )
                })?
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "'stop' must be a string or an array of strings",
                    Some("stop"),
                ));
            }
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "'stop' takes up to 4 non-empty strings",
                Some("stop"),
            ));
        }
        Ok(Gen {
            model,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            params: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: top_k.max(0) as usize,
                seed,
                max_tokens,
                ignore_eos: self.ignore_eos.unwrap_or(false),
            },
            stop,
        })
    }
}

/// The text of a completions `prompt`: one string (or an array holding exactly one).
pub fn prompt_text(v: &Option<Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Err(ApiError::invalid(
            "a prompt array with more than one string is not supported (send one request per prompt)",
            Some("prompt"),
        )),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "token-id prompts are not supported",
            Some("prompt"),
        )),
        None | Some(Value::Null) => Err(ApiError::invalid("'prompt' is required", Some("prompt"))),
        Some(_) => Err(ApiError::invalid(
            "'prompt' must be a string",
            Some("prompt"),
        )),
    }
}

/// `(role, text)` of each chat message; content is a string or an array of text parts.
pub fn chat_messages(v: &Option<Value>) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |m: &str| ApiError::invalid(m, Some("messages"));
    let Some(Value::Array(list)) = v else {
        return Err(bad("'messages' must be a non-empty array"));
    };
    if list.is_empty() {
        return Err(bad("'messages' must be a non-empty array"));
    }
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("every message needs a string 'role'"))?;
        let text = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        (Some(kind), _) => {
                            return Err(ApiError::unsupported(&format!(
                                "messages[].content[].type={kind}"
                            )));
                        }
                        _ => return Err(bad("content parts need a 'type'")),
                    }
                }
                s
            }
            Some(_) => return Err(bad("message content must be a string or an array of parts")),
        };
        out.push((role.to_string(), text));
    }
    Ok(out)
}
