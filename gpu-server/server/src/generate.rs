//! Turns the engine's token events into text: incremental UTF-8 decoding and stop strings.

use std::sync::Arc;
use std::time::Instant;

use kvmesh_gpu_server_engine::{Event, FinishReason};
use kvmesh_gpu_server_model::Tokenizer;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    End(&'static str),
}

/// Reads one request's events. Dropping it cancels the request in the engine.
#[derive(Debug)]
pub(crate) struct Generation {
    rx: mpsc::UnboundedReceiver<Event>,
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    pending: Vec<u8>,
    held: String,
    done: bool,
    end: Option<&'static str>,
    /// When the request arrived and where its time to first token goes (taken at the first token).
    ttft: Option<(Instant, Histogram)>,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) cached_tokens: usize,
}

impl Generation {
    pub(crate) fn new(
        rx: mpsc::UnboundedReceiver<Event>,
        tokenizer: Arc<Tokenizer>,
        stops: Vec<String>,
        prompt_tokens: usize,
        ttft: Option<(Instant, Histogram)>,
    ) -> Self {
        Self {
            rx,
            tokenizer,
            stops,
            pending: Vec::new(),
            held: String::new(),
            done: false,
            end: None,
            ttft,
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    /// The next piece; `None` after `End`.
    pub(crate) async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        if let Some(finish) = self.end.take() {
            return Some(Ok(Piece::End(finish)));
        }
        if self.done {
            return None;
        }
        loop {
            let Some(ev) = self.rx.recv().await else {
                self.done = true;
                return Some(Err(ApiError::internal("the engine stopped")));
            };
            match ev {
                Event::Started { cached_tokens } => self.cached_tokens = cached_tokens,
                Event::Token(t) => {
                    if let Some((arrived, h)) = self.ttft.take() {
                        h.observe(arrived.elapsed().as_secs_f64());
                    }
                    self.completion_tokens += 1;
                    if !self.tokenizer.is_special(t) {
                        self.pending.extend(self.tokenizer.token_bytes(t));
                    }
                    self.decode_pending(false);
                    if let Some(at) = self.earliest_stop() {
                        let text: String = self.held[..at].to_string();
                        self.held.clear();
                        self.done = true;
                        self.rx.close();
                        return Some(Ok(if text.is_empty() {
                            Piece::End("stop")
                        } else {
                            self.push_end("stop");
                            Piece::Text(text)
                        }));
                    }
                    let keep = self.holdback();
                    let cut = self.held.len() - keep;
                    if cut > 0 {
                        let text = self.held[..cut].to_string();
                        self.held.drain(..cut);
                        return Some(Ok(Piece::Text(text)));
                    }
                }
                Event::Finished(reason) => {
                    self.decode_pending(true);
                    self.done = true;
                    let finish = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    };
                    let text = std::mem::take(&mut self.held);
                    return Some(Ok(if text.is_empty() {
                        Piece::End(finish)
                    } else {
                        self.push_end(finish);
                        Piece::Text(text)
                    }));
                }
                Event::Failed(msg) => {
                    self.done = true;
                    return Some(Err(ApiError::internal(msg)));
                }
            }
        }
    }

    /// After a final text piece, the end marker comes on the next call.
    fn push_end(&mut self, finish: &'static str) {
        self.end = Some(finish);
    }

    fn decode_pending(&mut self, flush: bool) {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                self.held.push_str(s);
                self.pending.clear();
            }
            Err(e) => {
                let good = e.valid_up_to();
                self.held
                    .push_str(&String::from_utf8_lossy(&self.pending[..good]));
                if e.error_len().is_some() || flush {
                    // Invalid (not merely incomplete) bytes: replace them.
                    let rest = String::from_utf8_lossy(&self.pending[good..]).into_owned();
                    self.held.push_str(&rest);
                    self.pending.clear();
                } else {
                    self.pending.drain(..good);
                }
            }
        }
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Bytes at the end of `held` that could still begin a stop string.
    fn holdback(&self) -> usize {
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= self.held.len()
                    && self.held.is_char_boundary(self.held.len() - k)
                    && s.is_char_boundary(k)
                    && self.held.ends_with(&s[..k])
                {
                    keep = keep.max(k);
                    break;
                }
            }
        }
        keep
    }
}
