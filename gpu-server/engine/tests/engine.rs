//! The engine on a tiny random model: prefix caching gives the same logits as recompute
//! (cold, shared with a running request, after eviction), batching gives the same tokens,
//! cancellation frees blocks, a full queue refuses.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use kvmesh_gpu_server_engine::{
    Engine, EngineConfig, EngineHandle, Event, FinishReason, Request, SamplingParams, SubmitError,
};
use kvmesh_gpu_server_model::tiny::{TinySpec, write_gguf};
use tokio::sync::mpsc;

const TOL: f32 = 1e-4;

fn engine(cfg: EngineConfig) -> EngineHandle {
    let p = std::env::temp_dir().join(format!("kvmesh-engine-{}.gguf", std::process::id()));
    if !p.exists() {
        // Tests run in parallel; write_gguf renames a whole file into place.
        write_gguf(
            &p,
            &TinySpec {
                dtype: GgmlDType::Q8_0,
                ..TinySpec::default()
            },
        )
        .unwrap();
    }
    let loaded = kvmesh_gpu_server_model::load(&p).unwrap();
    Engine::start(
        Arc::new(loaded.model),
        loaded.tokenizer.stop_ids.clone(),
        cfg,
    )
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

struct Run {
    events: mpsc::UnboundedReceiver<Event>,
    logits: mpsc::UnboundedReceiver<Vec<f32>>,
}

fn submit(e: &EngineHandle, prompt: &[u32], params: SamplingParams) -> Run {
    let (tx, events) = mpsc::unbounded_channel();
    let (ltx, logits) = mpsc::unbounded_channel();
    e.submit(Request {
        prompt: prompt.to_vec(),
        params,
        chunks: Vec::new(),
        events: tx,
        logits: Some(ltx),
    })
    .unwrap();
    Run { events, logits }
}

/// (cached tokens, generated tokens, finish) of a finished run.
fn finish(r: &mut Run) -> (usize, Vec<u32>, FinishReason) {
    let mut cached = usize::MAX;
    let mut toks = Vec::new();
    loop {
        match r.events.blocking_recv().expect("engine hung up") {
            Event::Started { cached_tokens } => cached = cached_tokens,
            Event::Token(t) => toks.push(t),
            Event::Finished(f) => return (cached, toks, f),
            Event::Failed(m) => panic!("failed: {m}"),
        }
    }
}

/// The logits of the last prompt token: the one row every run computes itself.
fn last_prompt_logits(r: &mut Run, prompt_len: usize, cached: usize) -> Vec<f32> {
    let rows: Vec<Vec<f32>> = std::iter::from_fn(|| r.logits.try_recv().ok()).collect();
    // Rows arrive for every computed token: prompt_len - cached prompt rows, then one per
    // decode step.
    rows[prompt_len - cached - 1].clone()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 256)
        .collect()
}

fn wait_until(
    e: &EngineHandle,
    what: &str,
    ok: impl Fn(&kvmesh_gpu_server_engine::Status) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(&e.status()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cached_prefix_gives_the_same_logits_cold_shared_and_after_eviction() {
    let e = engine(EngineConfig {
        step_tokens: 64,
        ..EngineConfig::default()
    });
    let p = prompt(100, 1);
    // Cold.
    let mut a = submit(&e, &p, greedy(8));
    let (cached, toks_a, _) = finish(&mut a);
    assert_eq!(cached, 0);
    let cold = last_prompt_logits(&mut a, p.len(), 0);
    // Warm: 6 full blocks (96 tokens) come from the cache.
    let mut b = submit(&e, &p, greedy(8));
    let (cached, toks_b, _) = finish(&mut b);
    assert_eq!(cached, 96);
    assert_eq!(toks_a, toks_b);
    let warm = last_prompt_logits(&mut b, p.len(), 96);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "warm vs cold {}",
        max_diff(&cold, &warm)
    );
    // Shared with a running request: a long-running sequence holds the prefix while a second
    // request with the same prefix and a different tail reuses it.
    let mut holder = submit(&e, &p, greedy(400));
    match holder.events.blocking_recv() {
        Some(Event::Started { .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut p2 = p.clone();
    p2.extend([5, 6, 7]);
    let mut c = submit(&e, &p2, greedy(4));
    let (cached_c, _, _) = finish(&mut c);
    assert_eq!(cached_c, 96);
    let shared = last_prompt_logits(&mut c, p2.len(), 96);
    drop(holder);
    wait_until(&e, "holder cancelled", |s| {
        s.cancelled == 1 && s.load.running == 0
    });
    // After eviction: the same extended prompt recomputed from nothing.
    e.clear_cache();
    wait_until(&e, "cache cleared", |s| s.cache.cached == 0);
    let mut d = submit(&e, &p2, greedy(4));
    let (cached_d, _, _) = finish(&mut d);
    assert_eq!(cached_d, 0);
    let recomputed = last_prompt_logits(&mut d, p2.len(), 0);
    assert!(
        max_diff(&shared, &recomputed) < TOL,
        "shared vs recompute {}",
        max_diff(&shared, &recomputed)
    );
}

#[test]
fn a_fully_cached_prompt_recomputes_only_its_last_token_in_a_private_block() {
    let e = engine(EngineConfig {
        step_tokens: 64,
        ..EngineConfig::default()
    });
    let p = prompt(96, 3); // 6 full blocks: after one run every token's KV is cached
    let mut a = submit(&e, &p, greedy(8));
    let (cached, toks_a, _) = finish(&mut a);
    assert_eq!(cached, 0);
    let cold = last_prompt_logits(&mut a, p.len(), 0);
    // A running request holds the same blocks (so the last one is shared) while another one
    // takes them: each recomputes only the last prompt token, in a copy of its block.
    let mut holder = submit(&e, &p, greedy(400));
    match holder.events.blocking_recv() {
        Some(Event::Started { cached_tokens }) => assert_eq!(cached_tokens, 95),
        other => panic!("{other:?}"),
    }
    let mut b = submit(&e, &p, greedy(8));
    let (cached, toks_b, _) = finish(&mut b);
    assert_eq!(cached, 95, "all but the last prompt token from the cache");
    assert_eq!(toks_a, toks_b);
    let warm = last_prompt_logits(&mut b, p.len(), 95);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "fully cached vs cold {}",
        max_diff(&cold, &warm)
    );
    drop(holder);
    wait_until(&e, "holder cancelled", |s| {
        s.cancelled == 1 && s.load.running == 0
    });
    // Nothing leaked: every block is free or cached, and the copies were folded back into
    // the one cached block per hash when sealed.
    let s = e.status();
    assert_eq!(s.cache.in_use, 0);
    assert_eq!(s.cache.free + s.cache.cached, s.cache.num_blocks);
    // Served once more after all that: the same logits again.
    let mut c = submit(&e, &p, greedy(8));
    let (cached, toks_c, _) = finish(&mut c);
    assert_eq!((cached, &toks_c), (95, &toks_a));
    let again = last_prompt_logits(&mut c, p.len(), 95);
    assert!(max_diff(&cold, &again) < TOL);
}

#[test]
fn a_request_waits_for_a_running_prefill_of_its_prefix_rather_than_compute_it_again() {
    let e = engine(EngineConfig {
        step_tokens: 128,
        ..EngineConfig::default()
    });
    // A 2,000-token prompt (125 blocks) prefills in 16 steps; a second request made of the
    // same prompt and a tail arrives while it does. Computing beside it, the second would
    // take only what the first had sealed by the step it is admitted in (its last chunk,
    // 1,920..2,000, still running); waiting, it takes all 125 blocks.
    let a = prompt(2000, 7);
    let mut b = a.clone();
    b.extend([1, 2, 3]);
    let mut ra = submit(&e, &a, greedy(4));
    let mut rb = submit(&e, &b, greedy(4));
    assert_eq!(finish(&mut ra).0, 0);
    let (cached_b, toks_b, _) = finish(&mut rb);
    assert_eq!(
        cached_b, 2000,
        "every block the first request's prefill sealed"
    );
    // And the same tokens as computed alone.
    e.clear_cache();
    wait_until(&e, "cache cleared", |s| s.cache.cached == 0);
    let (cached, alone, _) = finish(&mut submit(&e, &b, greedy(4)));
    assert_eq!(cached, 0);
    assert_eq!(toks_b, alone);
}

#[test]
fn batched_decoding_gives_the_same_tokens_as_one_at_a_time() {
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(20 + 9 * i, i as u32 + 10)).collect();
    let e = engine(EngineConfig::default());
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            e.clear_cache();
            finish(&mut submit(&e, p, greedy(24))).1
        })
        .collect();
    let e2 = engine(EngineConfig::default());
    let mut runs: Vec<Run> = prompts.iter().map(|p| submit(&e2, p, greedy(24))).collect();
    let together: Vec<Vec<u32>> = runs.iter_mut().map(|r| finish(r).1).collect();
    assert_eq!(alone, together);
    let s = e2.status();
    assert!(
        s.steps < 4 * 25,
        "requests shared steps ({} steps)",
        s.steps
    );
}

#[test]
fn cancelling_frees_every_block() {
    let e = engine(EngineConfig::default());
    let mut r = submit(&e, &prompt(50, 3), greedy(1500));
    assert!(matches!(
        r.events.blocking_recv(),
        Some(Event::Started { .. })
    ));
    drop(r);
    // (The status is refreshed after each step: wait for the cancellation itself.)
    wait_until(&e, "cancelled request released", |s| {
        s.cancelled == 1 && s.load.running == 0 && s.cache.in_use == 0
    });
    let s = e.status();
    assert_eq!(s.cache.free + s.cache.cached, s.cache.num_blocks);
    assert_eq!(s.cancelled, 1);
}

#[test]
fn full_queue_refuses_and_too_long_prompts_are_refused() {
    let e = engine(EngineConfig {
        max_running: 1,
        max_waiting: 1,
        ..EngineConfig::default()
    });
    let busy = submit(&e, &prompt(10, 4), greedy(1900));
    wait_until(&e, "first request running", |s| s.load.running == 1);
    let _queued = submit(&e, &prompt(10, 5), greedy(4));
    let (tx, _rx) = mpsc::unbounded_channel();
    let third = e.submit(Request {
        prompt: prompt(10, 6),
        params: greedy(4),
        chunks: Vec::new(),
        events: tx,
        logits: None,
    });
    assert_eq!(third, Err(SubmitError::QueueFull));
    let (tx, _rx) = mpsc::unbounded_channel();
    let long = e.submit(Request {
        prompt: prompt(5000, 6),
        params: greedy(4),
        chunks: Vec::new(),
        events: tx,
        logits: None,
    });
    assert!(matches!(long, Err(SubmitError::TooLong { .. })));
    drop(busy);
}

#[test]
fn a_small_pool_preempts_and_still_finishes_everything() {
    // 12 blocks of 16 tokens: three sequences growing to 90 tokens cannot all fit at once.
    let e = engine(EngineConfig {
        num_blocks: 12,
        ..EngineConfig::default()
    });
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(30, 20 + i)).collect();
    let mut runs: Vec<Run> = prompts.iter().map(|p| submit(&e, p, greedy(60))).collect();
    let outs: Vec<Vec<u32>> = runs.iter_mut().map(|r| finish(r).1).collect();
    assert!(outs.iter().all(|o| o.len() == 60));
    let e2 = engine(EngineConfig::default());
    for (p, o) in prompts.iter().zip(&outs) {
        assert_eq!(
            &finish(&mut submit(&e2, p, greedy(60))).1,
            o,
            "preemption changed the output"
        );
    }
    wait_until(&e, "idle", |s| {
        s.generated_tokens == 180 && s.load.running == 0
    });
    let s = e.status();
    assert!(s.preemptions > 0, "the pool was meant to be too small");
    assert_eq!(s.cache.in_use, 0);
}

/// Submits `prompt` with its events on `events` (shared with other requests, so their
/// order across requests is the engine's own).
fn submit_to(
    e: &EngineHandle,
    prompt: &[u32],
    params: SamplingParams,
    events: &mpsc::UnboundedSender<Event>,
) {
    e.submit(Request {
        prompt: prompt.to_vec(),
        params,
        chunks: Vec::new(),
        events: events.clone(),
        logits: None,
    })
    .unwrap();
}

/// Events of one channel until `finished` requests have finished.
fn events_until(rx: &mut mpsc::UnboundedReceiver<Event>, finished: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < finished {
        let ev = rx.blocking_recv().expect("engine hung up");
        if let Event::Failed(m) = &ev {
            panic!("failed: {m}");
        }
        done += usize::from(matches!(ev, Event::Finished(_)));
        out.push(ev);
    }
    out
}

#[test]
fn a_short_request_gets_all_its_tokens_while_a_long_prefill_runs() {
    // A 2,000-token prompt prefills in 125 steps of 16 tokens; a 20-token one arrives right
    // behind it. Running sequences used to go first, so the long prefill took every step's
    // whole budget: the short request was admitted only beside its last chunk and got its
    // first token after the long one's. Now a partial chunk gives way to shorter prefill
    // work, and the short request prefills, decodes its 8 tokens and finishes while the long
    // prompt is still prefilling.
    let long = prompt(2000, 11);
    let short = prompt(20, 12);
    let e = engine(EngineConfig {
        step_tokens: 16,
        ..EngineConfig::default()
    });
    let alone = finish(&mut submit(&e, &short, greedy(8))).1;
    e.clear_cache();
    wait_until(&e, "cache cleared", |s| s.cache.cached == 0);
    for attempt in 0.. {
        let (tx, mut rx) = mpsc::unbounded_channel();
        submit_to(&e, &long, greedy(1), &tx);
        submit_to(&e, &short, greedy(8), &tx);
        let mut events: Vec<Event> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        if events.iter().any(|ev| matches!(ev, Event::Finished(_))) {
            // The long prompt ran out before the short one was even queued (a stalled test
            // thread): the case under test did not happen; run it again.
            assert!(attempt < 3, "the short request was never queued in time");
            events_until(&mut rx, 1);
            e.clear_cache();
            wait_until(&e, "cache cleared", |s| s.cache.cached == 0);
            continue;
        }
        events.extend(events_until(&mut rx, 2));
        let first_finish = events
            .iter()
            .position(|ev| matches!(ev, Event::Finished(_)))
            .unwrap();
        let tokens: Vec<u32> = events[..first_finish]
            .iter()
            .filter_map(|ev| match ev {
                Event::Token(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(
            tokens, alone,
            "the first request to finish is the short one, with its 8 tokens as computed alone \
             (the long prompt's single token would come first if it held every step)"
        );
        break;
    }
}

#[test]
fn a_long_prefill_is_not_starved_by_a_stream_of_short_requests() {
    // A 320-token prompt (5 chunks of 64) with 50 prompts of 60 tokens queued behind it:
    // every step has short prefill work until the last of them is admitted. The long
    // prefill gives way to it at most 4 steps in a row, then takes a step of its own, so it
    // finishes (about 25 steps) before the last short request starts (about 45).
    let e = engine(EngineConfig {
        step_tokens: 64,
        ..EngineConfig::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut others = Vec::new();
    submit_to(&e, &prompt(320, 21), greedy(1), &tx);
    for k in 0..49 {
        let (otx, orx) = mpsc::unbounded_channel();
        submit_to(&e, &prompt(60, 100 + k), greedy(1), &otx);
        others.push(orx); // kept open: a closed channel cancels its request
    }
    submit_to(&e, &prompt(60, 200), greedy(1), &tx);
    // On `tx`: the long request's events and the last short one's.
    let events = events_until(&mut rx, 2);
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::Started { .. },
                Event::Token(_),
                Event::Finished(_),
                Event::Started { .. },
                ..
            ]
        ),
        "the long prefill finished before the last short request started: {events:?}"
    );
    for mut o in others {
        events_until(&mut o, 1);
    }
}

#[test]
fn queued_prefill_counts_a_waiting_request_without_its_cached_prefix() {
    // One sequence at a time: a long decode runs, a request whose first 64 tokens (4 blocks)
    // are cached waits behind it. It will prefill its 30 tokens past them, and that is what
    // the load report (the replica's `queued_prefill_tokens`, which routers read) counts.
    let e = engine(EngineConfig {
        max_running: 1,
        ..EngineConfig::default()
    });
    let shared = prompt(64, 31);
    let with_tail = |salt: u32| -> Vec<u32> {
        let mut p = shared.clone();
        p.extend(prompt(30, salt));
        p
    };
    assert_eq!(finish(&mut submit(&e, &with_tail(32), greedy(1))).0, 0);
    let running = submit(&e, &prompt(50, 33), greedy(1500));
    wait_until(&e, "the long decode running", |s| {
        s.load.running == 1 && s.load.queued_prefill_tokens == 0
    });
    let mut waiting = submit(&e, &with_tail(34), greedy(1));
    wait_until(&e, "the second request waiting", |s| s.load.waiting == 1);
    assert_eq!(e.status().load.queued_prefill_tokens, 30);
    drop(running);
    assert_eq!(finish(&mut waiting).0, 64);
}
