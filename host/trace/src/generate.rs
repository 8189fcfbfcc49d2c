//! Seeded workload generators: the same seed gives the same trace, byte for
//! byte, on every machine (ChaCha8).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::TraceRequest;

/// The shape of the traffic.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Chat requests from several tenants; each tenant has its own long
    /// system prompt shared by all its requests, followed by a fresh
    /// question. Tenant k is picked with weight `1/(k+1)^skew`.
    SharedSystemPrompts {
        /// Number of tenants.
        tenants: u32,
        /// Popularity skew: 1 is Zipf (tenant k with weight 1/(k+1)), 0 is
        /// uniform (the shape of SGLang's generated-shared-prefix benchmark).
        skew: f64,
        /// Bytes of each tenant's system prompt.
        system_bytes: usize,
        /// Bytes of each question.
        question_bytes: usize,
        /// Some questions carry a long text of their own (a pasted document
        /// or retrieved passages), so their prompt is mostly not shared.
        long_questions: Option<LongQuestions>,
    },
    /// Conversations: each request of a session repeats the whole history
    /// (user and assistant turns) and adds a new user turn.
    MultiTurnChat {
        /// Concurrent sessions.
        sessions: u32,
        /// Turns per session before it is replaced by a new one.
        turns: u32,
        /// Bytes per user turn.
        turn_bytes: usize,
        /// Bytes per assistant reply kept in the history.
        reply_bytes: usize,
    },
    /// Completions over long documents: `Document: ... Question: ...`, so
    /// questions on one document share its prefix. Document k is picked with
    /// weight `1/(k+1)^skew`.
    LongDocQa {
        /// Number of documents.
        documents: u32,
        /// Popularity skew, as for [`Workload::SharedSystemPrompts`].
        skew: f64,
        /// Bytes per document.
        document_bytes: usize,
        /// Bytes per question.
        question_bytes: usize,
    },
    /// Unrelated completions prompts: no sharing beyond chance.
    Uncorrelated {
        /// Bytes per prompt.
        prompt_bytes: usize,
    },
}

/// The questions of [`Workload::SharedSystemPrompts`] that are long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongQuestions {
    /// Fraction of the requests, 0..=1.
    pub share: f64,
    /// Bytes of each long question, in place of `question_bytes`.
    pub bytes: usize,
}

/// When requests arrive and how long their answers are.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrivals {
    /// Mean arrival rate (Poisson), requests per second.
    pub rate_per_s: f64,
    /// Output tokens, drawn uniformly from this inclusive range.
    pub output_tokens: (u32, u32),
}

impl Default for Arrivals {
    fn default() -> Self {
        Self {
            rate_per_s: 20.0,
            output_tokens: (16, 128),
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "cache",
    "routing",
    "replica",
    "prefix",
    "token",
    "model",
    "request",
    "latency",
    "kernel",
    "gateway",
    "memory",
    "tier",
    "device",
    "host",
    "disk",
    "batch",
    "decode",
    "prefill",
    "queue",
    "policy",
    "envoy",
    "filter",
    "chunk",
    "hash",
    "score",
    "load",
    "cluster",
    "answer",
    "question",
    "document",
    "tenant",
    "session",
    "system",
    "user",
    "assistant",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "with",
    "on",
    "that",
    "by",
    "as",
    "from",
    "at",
    "an",
    "be",
    "this",
];

fn text(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        if !s.is_empty() {
            s.push(' ');
        }
        if rng.random_range(0..8) == 0 {
            s.push_str(&rng.random_range(0..100_000u32).to_string());
        } else {
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
    }
    s.truncate(bytes);
    s
}

/// A chat session: id, history of (role, text), turns taken.
type Session = (u64, Vec<(String, String)>, u32);

/// Picks 0..n with weight `1/(k+1)^skew` (skew 0: uniform; negative is
/// taken as 0).
fn zipf(rng: &mut ChaCha8Rng, n: u32, skew: f64) -> u32 {
    let n = n.max(1);
    let skew = if skew.is_finite() { skew.max(0.0) } else { 1.0 };
    let weight = |k: u32| f64::from(k + 1).powf(-skew);
    let total: f64 = (0..n).map(weight).sum();
    let mut x = rng.random::<f64>() * total;
    for k in 0..n {
        x -= weight(k);
        if x <= 0.0 {
            return k;
        }
    }
    n - 1
}

/// Generates `requests` requests of `workload` for `model`.
pub fn generate(workload: &Workload, requests: usize, model: &str, seed: u64) -> Vec<TraceRequest> {
    generate_with(workload, requests, model, seed, &Arrivals::default())
}

/// [`generate`] with explicit arrivals.
pub fn generate_with(
    workload: &Workload,
    requests: usize,
    model: &str,
    seed: u64,
    arrivals: &Arrivals,
) -> Vec<TraceRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Fixed per-trace material (prompts, documents) from its own stream so
    // the request stream does not shift it.
    let mut fixed = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let rate = arrivals.rate_per_s.max(1e-9);
    let (lo, hi) = (
        arrivals.output_tokens.0,
        arrivals.output_tokens.1.max(arrivals.output_tokens.0),
    );
    let mut at_ms = 0.0f64;
    let mut out = Vec::with_capacity(requests);

    let shared: Vec<String> = match workload {
        Workload::SharedSystemPrompts {
            tenants,
            system_bytes,
            ..
        } => (0..*tenants)
            .map(|_| text(&mut fixed, *system_bytes))
            .collect(),
        Workload::LongDocQa {
            documents,
            document_bytes,
            ..
        } => (0..*documents)
            .map(|_| text(&mut fixed, *document_bytes))
            .collect(),
        _ => Vec::new(),
    };
    // Multi-turn sessions: (id, history of (role, text), turns taken).
    let mut sessions: Vec<Session> = Vec::new();
    let mut next_session = 0u64;

    for _ in 0..requests {
        let gap_s = -(1.0 - rng.random::<f64>()).ln() / rate;
        at_ms += gap_s * 1000.0;
        let output_tokens = rng.random_range(lo..=hi);
        let (path, body, tag) = match workload {
            Workload::SharedSystemPrompts {
                tenants,
                skew,
                question_bytes,
                long_questions,
                ..
            } => {
                let t = zipf(&mut rng, *tenants, *skew);
                // Drawn only when asked for, so traces without long
                // questions stay what they were.
                let bytes = match long_questions {
                    Some(l) if l.share > 0.0 && rng.random::<f64>() < l.share => l.bytes,
                    _ => *question_bytes,
                };
                let q = text(&mut rng, bytes);
                (
                    "/v1/chat/completions",
                    json!({
                        "model": model,
                        "messages": [
                            {"role": "system", "content": shared[t as usize]},
                            {"role": "user", "content": q},
                        ],
                        "max_tokens": output_tokens,
                    }),
                    format!("tenant-{t}"),
                )
            }
            Workload::MultiTurnChat {
                sessions: n,
                turns,
                turn_bytes,
                reply_bytes,
            } => {
                let n = (*n).max(1) as usize;
                while sessions.len() < n {
                    sessions.push((next_session, Vec::new(), 0));
                    next_session += 1;
                }
                let i = rng.random_range(0..n);
                let turn = text(&mut rng, *turn_bytes);
                let reply = text(&mut rng, *reply_bytes);
                let s = &mut sessions[i];
                s.1.push(("user".to_owned(), turn));
                let messages: Vec<_> =
                    s.1.iter()
                        .map(|(role, content)| json!({"role": role, "content": content}))
                        .collect();
                s.1.push(("assistant".to_owned(), reply));
                s.2 += 1;
                let tag = format!("session-{}", s.0);
                if s.2 >= (*turns).max(1) {
                    sessions[i] = (next_session, Vec::new(), 0);
                    next_session += 1;
                }
                (
                    "/v1/chat/completions",
                    json!({"model": model, "messages": messages, "max_tokens": output_tokens}),
                    tag,
                )
            }
            Workload::LongDocQa {
                documents,
                skew,
                question_bytes,
                ..
            } => {
                let d = zipf(&mut rng, *documents, *skew);
                let q = text(&mut rng, *question_bytes);
                let prompt = format!(
                    "Document:\n{}\n\nQuestion: {q}\nAnswer:",
                    shared[d as usize]
                );
                (
                    "/v1/completions",
                    json!({"model": model, "prompt": prompt, "max_tokens": output_tokens}),
                    format!("doc-{d}"),
                )
            }
            Workload::Uncorrelated { prompt_bytes } => (
                "/v1/completions",
                json!({"model": model, "prompt": text(&mut rng, *prompt_bytes), "max_tokens": output_tokens}),
                "uncorrelated".to_owned(),
            ),
        };
        out.push(TraceRequest {
            at_ms: (at_ms * 1000.0).round() / 1000.0,
            path: path.to_owned(),
            body,
            output_tokens,
            tag: Some(tag),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        let w = Workload::SharedSystemPrompts {
            tenants: 3,
            skew: 1.0,
            system_bytes: 500,
            question_bytes: 50,
            long_questions: None,
        };
        assert_eq!(generate(&w, 20, "m", 1), generate(&w, 20, "m", 1));
        assert_ne!(generate(&w, 20, "m", 1), generate(&w, 20, "m", 2));
    }

    #[test]
    fn tenants_share_their_system_prompt() {
        let w = Workload::SharedSystemPrompts {
            tenants: 2,
            skew: 1.0,
            system_bytes: 300,
            question_bytes: 40,
            long_questions: None,
        };
        let t = generate(&w, 50, "m", 3);
        let mut seen = std::collections::HashMap::new();
        for r in &t {
            let sys = r.body["messages"][0]["content"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(sys.len(), 300);
            let prev = seen.insert(r.tag.clone().unwrap(), sys.clone());
            if let Some(prev) = prev {
                assert_eq!(prev, sys);
            }
        }
        assert_eq!(seen.len(), 2);
        assert!(t.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn skew_sets_popularity() {
        let counts = |skew: f64| {
            let w = Workload::SharedSystemPrompts {
                tenants: 4,
                skew,
                system_bytes: 10,
                question_bytes: 10,
                long_questions: None,
            };
            let mut n = [0u32; 4];
            for r in generate(&w, 4000, "m", 11) {
                let t: usize = r.tag.unwrap()["tenant-".len()..].parse().unwrap();
                n[t] += 1;
            }
            n
        };
        // Zipf: weights 1, 1/2, 1/3, 1/4 of 25/12 -> 48 %, 24 %, 16 %, 12 %.
        let z = counts(1.0);
        assert!((1800..2050).contains(&z[0]), "{z:?}");
        assert!((380..580).contains(&z[3]), "{z:?}");
        // Uniform: 25 % each.
        let u = counts(0.0);
        assert!(u.iter().all(|&c| (900..1100).contains(&c)), "{u:?}");
    }

    #[test]
    fn long_questions_take_their_share_and_leave_other_traces_alone() {
        let workload = |long_questions| Workload::SharedSystemPrompts {
            tenants: 4,
            skew: 0.0,
            system_bytes: 100,
            question_bytes: 20,
            long_questions,
        };
        let question_len =
            |r: &TraceRequest| r.body["messages"][1]["content"].as_str().unwrap().len();
        let t = generate(
            &workload(Some(LongQuestions {
                share: 0.25,
                bytes: 900,
            })),
            2000,
            "m",
            4,
        );
        let n_long = t.iter().filter(|r| question_len(r) == 900).count();
        assert!((430..570).contains(&n_long), "{n_long} long of 2000");
        assert!(t.iter().all(|r| [20, 900].contains(&question_len(r))));
        // A share of 0 is the plain trace, byte for byte.
        let none = workload(Some(LongQuestions {
            share: 0.0,
            bytes: 900,
        }));
        assert_eq!(
            generate(&workload(None), 50, "m", 4),
            generate(&none, 50, "m", 4)
        );
    }

    #[test]
    fn multi_turn_history_grows_and_repeats_earlier_turns() {
        let w = Workload::MultiTurnChat {
            sessions: 1,
            turns: 3,
            turn_bytes: 20,
            reply_bytes: 30,
        };
        let t = generate(&w, 4, "m", 5);
        let msgs = |i: usize| t[i].body["messages"].as_array().unwrap().clone();
        assert_eq!(msgs(0).len(), 1);
        assert_eq!(msgs(1).len(), 3);
        assert_eq!(msgs(2).len(), 5);
        assert_eq!(msgs(2)[..3], msgs(1)[..]);
        // After 3 turns a new session starts.
        assert_eq!(msgs(3).len(), 1);
        assert_ne!(t[3].tag, t[0].tag);
    }

    #[test]
    fn documents_prefix_their_questions() {
        let w = Workload::LongDocQa {
            documents: 4,
            skew: 1.0,
            document_bytes: 1000,
            question_bytes: 30,
        };
        for r in generate(&w, 10, "m", 9) {
            let p = r.body["prompt"].as_str().unwrap();
            assert!(p.starts_with("Document:\n"));
            assert!(p.len() > 1000);
        }
    }
}
