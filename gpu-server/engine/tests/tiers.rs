//! The KV tiers on a tiny random model: a prefix served from HOST, from DISK (file reads,
//! after the writes landed) and from DISK after a restart gives the same logits as computing
//! it from nothing; residency moves between tiers on the state stream; a disk directory that
//! cannot be used, or a disk too small for the tier, leaves the other tiers serving.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use kvmesh_gpu_server_engine::{
    ChunkEnd, Engine, EngineConfig, EngineHandle, Event, FetchPolicy, Request, SamplingParams,
    StateUpdate, Status, TierConfig,
};
use kvmesh_gpu_server_kv::Tier;
use kvmesh_gpu_server_model::tiny::{TinySpec, write_gguf};
use tokio::sync::mpsc;

const TOL: f32 = 1e-4;
/// Device blocks: 160 tokens, so a second long prompt pushes the first one out.
const DEVICE: usize = 10;

fn model_path() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("kvmesh-tiers-{}.gguf", std::process::id()));
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
    p
}

fn engine(host: usize, disk: usize, dir: Option<&Path>) -> EngineHandle {
    engine_with(host, disk, dir, EngineConfig::default().max_running)
}

fn engine_with(host: usize, disk: usize, dir: Option<&Path>, max_running: usize) -> EngineHandle {
    let loaded = kvmesh_gpu_server_model::load(&model_path()).unwrap();
    Engine::start_tiered(
        Arc::new(loaded.model),
        loaded.tokenizer.stop_ids.clone(),
        EngineConfig {
            num_blocks: DEVICE,
            max_running,
            ..EngineConfig::default()
        },
        &TierConfig {
            host_blocks: host,
            disk_blocks: disk,
            disk_dir: dir.map(Path::to_path_buf),
            model_tag: 42,
            fetch: FetchPolicy::Always,
        },
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

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 256)
        .collect()
}

/// Runs `p` to the end; returns (cached tokens, logits of the last prompt token).
fn run(e: &EngineHandle, p: &[u32], chunks: Vec<ChunkEnd>) -> (usize, Vec<f32>) {
    let (tx, mut events) = mpsc::unbounded_channel();
    let (ltx, mut logits) = mpsc::unbounded_channel();
    e.submit(Request {
        prompt: p.to_vec(),
        params: greedy(2),
        chunks,
        events: tx,
        logits: Some(ltx),
    })
    .unwrap();
    let mut cached = usize::MAX;
    loop {
        match events.blocking_recv().expect("engine hung up") {
            Event::Started { cached_tokens } => cached = cached_tokens,
            Event::Token(_) => {}
            Event::Finished(_) => break,
            Event::Failed(m) => panic!("failed: {m}"),
        }
    }
    let rows: Vec<Vec<f32>> = std::iter::from_fn(|| logits.try_recv().ok()).collect();
    (cached, rows[p.len() - cached - 1].clone())
}

fn wait_until(e: &EngineHandle, what: &str, ok: impl Fn(&Status) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(&e.status()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tier(s: &Status, t: Tier) -> &kvmesh_gpu_server_engine::TierStatus {
    s.tiers.iter().find(|x| x.tier == t).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An engine with a 16-block host tier where `p` (6 full blocks) ran cold and then `q`
/// (all 10 device blocks) pushed p's blocks down to host memory.
fn demoted_to_host(p: &[u32], q: &[u32]) -> EngineHandle {
    let e = engine(16, 0, None);
    assert_eq!(run(&e, p, Vec::new()).0, 0);
    run(&e, q, Vec::new());
    wait_until(&e, "p demoted to host", |s| {
        tier(s, Tier::Host).counters.demotions >= 6
    });
    e
}

#[test]
fn a_prefix_from_each_tier_gives_the_logits_of_recompute() {
    let p = prompt(100, 1); // 6 full blocks are reusable
    let q = prompt(150, 2); // needs all 10 device blocks
    let (_, cold) = run(&engine(0, 0, None), &p, Vec::new());

    // HOST: q pushes p's blocks down to host memory; p comes back from there.
    let e = demoted_to_host(&p, &q);
    let (cached, warm) = run(&e, &p, Vec::new());
    assert_eq!(cached, 96);
    let s = e.status();
    assert_eq!(tier(&s, Tier::Host).counters.promotions, 6);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "host {}",
        max_diff(&cold, &warm)
    );

    // DISK (no host tier): demotions go straight to the slabs; once the writes have landed,
    // the promotion reads the files.
    let dir = tempfile::tempdir().unwrap();
    let e = engine(0, 32, Some(dir.path()));
    run(&e, &p, Vec::new());
    run(&e, &q, Vec::new());
    wait_until(&e, "p written to disk", |s| {
        tier(s, Tier::Disk).counters.demotions >= 6 && s.disk.pending_writes == 0
    });
    let (cached, warm) = run(&e, &p, Vec::new());
    assert_eq!(cached, 96);
    let s = e.status();
    assert_eq!(tier(&s, Tier::Disk).counters.promotions, 6);
    assert!(s.disk.reads >= 6, "read from the files: {:?}", s.disk);
    // Written moments ago, so in the page cache: copied out of the slabs' mapping.
    assert_eq!(s.disk.reads_mapped, s.disk.reads, "{:?}", s.disk);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "disk {}",
        max_diff(&cold, &warm)
    );

    // Warm restart: a new engine on a directory where p was written indexes its blocks
    // (and nothing else) and serves p from disk.
    drop(e);
    let dir = tempfile::tempdir().unwrap();
    let e = engine(0, 32, Some(dir.path()));
    run(&e, &p, Vec::new());
    run(&e, &q, Vec::new());
    wait_until(&e, "p written to disk", |s| {
        tier(s, Tier::Disk).counters.demotions >= 6 && s.disk.pending_writes == 0
    });
    drop(e);
    let e2 = engine(0, 32, Some(dir.path()));
    let s = e2.status();
    assert_eq!(s.disk.restored, 6, "{:?}", s.disk);
    assert_eq!(s.disk.scan.corrupt, 0);
    let (cached, warm) = run(&e2, &p, Vec::new());
    assert_eq!(cached, 96);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "restart {}",
        max_diff(&cold, &warm)
    );
}

#[test]
fn a_fully_cached_prompt_promoted_from_the_host_tier_recomputes_its_last_token() {
    // Block-aligned: the last block is promoted too, and its private copy is made after the
    // promotion has brought its bytes.
    let p = prompt(96, 3);
    let q = prompt(150, 2);
    let (_, cold) = run(&engine(0, 0, None), &p, Vec::new());
    let e = demoted_to_host(&p, &q);
    let (cached, warm) = run(&e, &p, Vec::new());
    assert_eq!(cached, 95);
    assert_eq!(tier(&e.status(), Tier::Host).counters.promotions, 6);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "host, fully cached {}",
        max_diff(&cold, &warm)
    );
}

#[test]
fn disk_blocks_of_a_waiting_request_are_read_ahead() {
    let p = prompt(100, 7);
    let (_, cold) = run(&engine(0, 0, None), &p, Vec::new());
    let dir = tempfile::tempdir().unwrap();
    // One running sequence at a time: a second request waits in the queue.
    let e = engine_with(0, 32, Some(dir.path()), 1);
    run(&e, &p, Vec::new());
    run(&e, &prompt(150, 8), Vec::new());
    wait_until(&e, "p written to disk", |s| {
        tier(s, Tier::Disk).counters.demotions >= 6 && s.disk.pending_writes == 0
    });
    // A long request runs; p queues behind it and its six disk blocks are read meanwhile.
    let (tx, mut busy) = mpsc::unbounded_channel();
    e.submit(Request {
        prompt: prompt(20, 9),
        params: greedy(120),
        chunks: Vec::new(),
        events: tx,
        logits: None,
    })
    .unwrap();
    assert!(matches!(busy.blocking_recv(), Some(Event::Started { .. })));
    let (cached, warm) = run(&e, &p, Vec::new());
    assert_eq!(cached, 96);
    assert_eq!(e.status().disk.prefetched, 6);
    assert!(
        max_diff(&cold, &warm) < TOL,
        "prefetched {}",
        max_diff(&cold, &warm)
    );
}

#[test]
fn a_demoted_chunk_moves_between_tiers_on_the_state_stream() {
    let e = engine(16, 0, None);
    let mut rx = e.subscribe();
    // Snapshots first: one per enabled tier, same seq.
    let mut snaps = Vec::new();
    for _ in 0..2 {
        match rx.blocking_recv().unwrap() {
            StateUpdate::Snapshot {
                seq,
                tier,
                resident,
            } => snaps.push((seq, tier, resident)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        snaps,
        vec![(0, Tier::Device, vec![]), (0, Tier::Host, vec![])]
    );
    let p = prompt(100, 3);
    run(
        &e,
        &p,
        vec![ChunkEnd {
            hash: 0xc0,
            token: 20,
        }],
    );
    run(&e, &prompt(150, 4), Vec::new());
    wait_until(&e, "demoted", |s| {
        tier(s, Tier::Host).resident_chunks == vec![0xc0]
    });
    // Read in order until the load shows p's blocks in host (the engine sends its load when
    // it goes idle, so that message comes).
    let mut residency = Vec::new();
    let host_load = loop {
        match rx.blocking_recv().expect("engine hung up") {
            StateUpdate::Load(l) => {
                let h = l.tiers.iter().find(|t| t.tier == Tier::Host).copied();
                if h.is_some_and(|h| h.used_blocks >= 6) {
                    break h;
                }
            }
            other => residency.push(other),
        }
    };
    assert_eq!(
        residency,
        vec![
            StateUpdate::Delta {
                seq: 1,
                tier: Tier::Device,
                added: vec![0xc0],
                removed: vec![]
            },
            StateUpdate::Delta {
                seq: 2,
                tier: Tier::Device,
                added: vec![],
                removed: vec![0xc0]
            },
            StateUpdate::Delta {
                seq: 3,
                tier: Tier::Host,
                added: vec![0xc0],
                removed: vec![]
            },
        ]
    );
    let host_load = host_load.expect("a load report with the host tier");
    assert_eq!(host_load.capacity_blocks, 16);
    assert!(host_load.used_blocks >= 6);
}

#[test]
fn an_unusable_or_too_small_disk_leaves_two_tiers_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_dir = tmp.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    // A directory that is a file, and a tier far larger than the disk.
    for (dir, slots) in [(not_a_dir.as_path(), 32), (tmp.path(), 1 << 40)] {
        let e = engine(16, slots, Some(dir));
        let s = e.status();
        assert!(!s.disk.enabled);
        assert!(s.disk.disabled_reason.is_some());
        assert!(!tier(&s, Tier::Disk).enabled);
        let p = prompt(100, 5);
        run(&e, &p, Vec::new());
        run(&e, &prompt(150, 6), Vec::new());
        wait_until(&e, "demoted to host", |s| {
            tier(s, Tier::Host).counters.demotions >= 6
        });
        assert_eq!(run(&e, &p, Vec::new()).0, 96, "host still serves");
    }
}
