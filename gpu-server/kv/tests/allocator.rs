//! Property and scenario tests of the block allocator, prefix index and chunk residency.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use kvmesh_gpu_server_kv::{
    BlockManager, BlockTable, KvConfig, ResidencyEvent, Tier, block_hashes,
};
use proptest::prelude::*;

const BT: usize = 4;

fn mgr(n: usize) -> BlockManager {
    BlockManager::new(KvConfig {
        block_tokens: BT,
        num_blocks: n,
    })
}

/// Runs one whole sequence: adopt its cached prefix, reserve, compute in steps, seal.
fn run_seq(m: &mut BlockManager, tokens: &[u32]) -> Option<(BlockTable, usize)> {
    let mut t = BlockTable::new(BT);
    let cached = t.adopt_prefix(m, tokens, tokens.len() - 1);
    if t.reserve(m, tokens.len()).is_err() {
        t.release(m);
        return None;
    }
    t.commit(m, tokens, tokens.len()).ok()?;
    Some((t, cached))
}

#[test]
fn second_request_reuses_the_prefix_and_not_the_last_token() {
    let mut m = mgr(16);
    let tokens: Vec<u32> = (0..12).collect();
    let (mut a, cached) = run_seq(&mut m, &tokens).unwrap();
    assert_eq!(cached, 0);
    let a_ids = a.ids().to_vec();
    a.release(&mut m);
    assert_eq!(m.stats().cached, 3);
    // Same prompt: 12 tokens = 3 full blocks, but the last token must be recomputed,
    // so only 2 blocks (8 tokens) are reused.
    let (mut b, cached) = run_seq(&mut m, &tokens).unwrap();
    assert_eq!(cached, 8);
    // The recomputed third block seals onto the cached one.
    assert_eq!(b.ids(), &a_ids[..]);
    b.release(&mut m);
    m.check().unwrap();
    assert_eq!(m.stats().in_use, 0);
}

#[test]
fn lru_evicts_the_tail_first_and_reports_its_chunks() {
    let mut m = mgr(4);
    let tokens: Vec<u32> = (0..16).collect();
    let (mut a, _) = run_seq(&mut m, &tokens).unwrap();
    let h = a.hashes().to_vec();
    m.map_chunks(h[1], &[111]);
    m.map_chunks(h[3], &[333]);
    a.release(&mut m);
    assert_eq!(
        m.take_events(),
        vec![
            ResidencyEvent::Added {
                chunk: 111,
                tier: Tier::Device
            },
            ResidencyEvent::Added {
                chunk: 333,
                tier: Tier::Device
            },
        ]
    );
    // A different sequence needs one block: the tail (block 3) goes, not the head.
    let (mut b, cached) = run_seq(&mut m, &[9, 9, 9]).unwrap();
    assert_eq!(cached, 0);
    assert_eq!(
        m.take_events(),
        vec![ResidencyEvent::Removed {
            chunk: 333,
            tier: Tier::Device
        }]
    );
    assert_eq!(m.cached_prefix(&h), 3);
    b.release(&mut m);
    m.check().unwrap();
}

#[test]
fn evicting_a_block_drops_its_cached_descendants() {
    let mut m = mgr(3);
    let (mut a, _) = run_seq(&mut m, &[1, 1, 1, 1, 2, 2, 2, 2]).unwrap();
    let h = a.hashes().to_vec();
    m.map_chunks(h[1], &[7]);
    a.release(&mut m);
    // An unrelated sequence needs all three blocks: the child goes with its parent.
    let (mut b, _) = run_seq(&mut m, &[5; 12]).unwrap();
    assert_eq!(m.cached_prefix(&h), 0);
    assert!(!m.chunk_map().contains(7));
    b.release(&mut m);
    m.check().unwrap();
}

#[test]
fn out_of_blocks_keeps_nothing() {
    let mut m = mgr(2);
    let mut t = BlockTable::new(BT);
    assert!(t.reserve(&mut m, 9).is_err());
    assert_eq!(m.stats().free, 2);
    m.check().unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Start(Vec<u32>),
    Step(usize, usize),
    End(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u32..3, 1..24).prop_map(Op::Start),
        4 => (0usize..8, 1usize..6).prop_map(|(i, n)| Op::Step(i, n)),
        3 => (0usize..8).prop_map(Op::End),
        1 => Just(Op::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// No leak, no double free, references never negative; after every sequence ends, every
    /// block is free or cached; the chunk map only holds chunks of cached blocks.
    #[test]
    fn allocator_invariants(ops in prop::collection::vec(op(), 1..60), blocks in 2usize..12) {
        let mut m = mgr(blocks);
        let mut live: Vec<(BlockTable, Vec<u32>)> = Vec::new();
        for op in ops {
            match op {
                Op::Start(tokens) => {
                    let mut t = BlockTable::new(BT);
                    t.adopt_prefix(&mut m, &tokens, tokens.len() - 1);
                    let first = (t.computed() + 1).min(tokens.len());
                    if t.reserve(&mut m, first).is_ok() {
                        let sealed = t.commit(&mut m, &tokens, first).unwrap();
                        for (i, h) in sealed {
                            m.map_chunks(h, &[tokens[..(i + 1) * BT].iter().map(|&x| u64::from(x)).sum::<u64>() * 1000 + i as u64]);
                        }
                        live.push((t, tokens));
                    } else {
                        t.release(&mut m);
                    }
                }
                Op::Step(i, n) => {
                    if live.is_empty() { continue; }
                    let k = i % live.len();
                    let (t, tokens) = &mut live[k];
                    tokens.extend(std::iter::repeat_n(1, n));
                    let target = tokens.len();
                    if t.reserve(&mut m, target).is_ok() {
                        t.commit(&mut m, tokens, target).unwrap();
                    }
                }
                Op::End(i) => {
                    if live.is_empty() { continue; }
                    let (mut t, _) = live.swap_remove(i % live.len());
                    t.release(&mut m);
                }
                Op::Clear => m.clear_cache(),
            }
            prop_assert_eq!(m.check(), Ok(()));
            // Every block a live sequence holds is still referenced and hashes match its tokens.
            for (t, tokens) in &live {
                let expect = block_hashes(&tokens[..t.hashes().len() * BT], BT);
                prop_assert_eq!(t.hashes(), &expect[..]);
            }
        }
        for (mut t, _) in live.drain(..) {
            t.release(&mut m);
        }
        prop_assert_eq!(m.check(), Ok(()));
        let s = m.stats();
        prop_assert_eq!(s.in_use, 0);
        prop_assert_eq!(s.free + s.cached, blocks);
        prop_assert!(s.resident_chunks <= s.cached);
    }
}
