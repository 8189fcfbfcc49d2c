//! Request traces for replaying LLM traffic: the JSONL format and seeded
//! generators for the workloads cache-aware routing is about.
//!
//! # Format
//! One JSON object per line, in arrival order:
//!
//! ```json
//! {"at_ms":12.5,"path":"/v1/chat/completions","body":{"model":"m","messages":[...]},"output_tokens":64,"tag":"tenant-3"}
//! ```
//!
//! - `at_ms` (number, required): arrival time in milliseconds from the start
//!   of the trace; non-decreasing.
//! - `path` (string, required): the OpenAI endpoint, `/v1/completions` or
//!   `/v1/chat/completions`.
//! - `body` (object, required): the OpenAI request body exactly as a client
//!   sends it.
//! - `output_tokens` (integer, required): how many tokens the response has;
//!   a simulator decodes this many, a load generator sets `max_tokens`.
//! - `tag` (string, optional): who sent it (tenant, session, document), for
//!   analysis only.
//!
//! Lines that are empty or start with `#` are skipped.

mod generate;

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

pub use generate::{Arrivals, LongQuestions, Workload, generate, generate_with};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival time, milliseconds from the start of the trace.
    pub at_ms: f64,
    /// OpenAI endpoint path.
    pub path: String,
    /// OpenAI request body.
    pub body: serde_json::Value,
    /// Tokens in the response.
    pub output_tokens: u32,
    /// Sender (tenant, session, document), for analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl TraceRequest {
    /// The body as bytes, as a client would send it.
    pub fn body_bytes(&self) -> Vec<u8> {
        // Serializing a `Value` cannot fail.
        serde_json::to_vec(&self.body).unwrap_or_default()
    }
}

/// Why a trace could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading or writing failed.
    #[error("trace i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not a valid trace request.
    #[error("trace line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Writes a trace as JSONL.
pub fn write_jsonl(mut w: impl Write, trace: &[TraceRequest]) -> Result<(), TraceError> {
    for r in trace {
        serde_json::to_writer(&mut w, r).map_err(std::io::Error::other)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// Reads a JSONL trace and checks it (known path, object body, arrival
/// times finite and non-decreasing).
pub fn read_jsonl(r: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out: Vec<TraceRequest> = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let bad = |message: String| TraceError::Line {
            line: i + 1,
            message,
        };
        let req: TraceRequest = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !req.at_ms.is_finite() || req.at_ms < 0.0 {
            return Err(bad(format!("at_ms {} is not a time", req.at_ms)));
        }
        if let Some(prev) = out.last()
            && req.at_ms < prev.at_ms
        {
            return Err(bad(format!(
                "at_ms {} is before the previous request's {}",
                req.at_ms, prev.at_ms
            )));
        }
        if !matches!(
            req.path.as_str(),
            "/v1/completions" | "/v1/chat/completions"
        ) {
            return Err(bad(format!("unknown path {:?}", req.path)));
        }
        if !req.body.is_object() {
            return Err(bad("body is not a JSON object".to_owned()));
        }
        out.push(req);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trips_and_rejects_bad_lines() {
        let trace = generate(&Workload::Uncorrelated { prompt_bytes: 100 }, 5, "m", 7);
        let mut buf = Vec::new();
        write_jsonl(&mut buf, &trace).unwrap();
        assert_eq!(read_jsonl(&buf[..]).unwrap(), trace);

        let backwards = b"{\"at_ms\":5,\"path\":\"/v1/completions\",\"body\":{},\"output_tokens\":1}\n\
                          {\"at_ms\":4,\"path\":\"/v1/completions\",\"body\":{},\"output_tokens\":1}\n";
        let err = read_jsonl(&backwards[..]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let bad_path =
            b"# comment\n{\"at_ms\":1,\"path\":\"/v2/x\",\"body\":{},\"output_tokens\":1}\n";
        let err = read_jsonl(&bad_path[..]).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("/v2/x"), "{err}");
        let not_json = b"{\"at_ms\":1,";
        assert!(read_jsonl(&not_json[..]).is_err());
    }
}
