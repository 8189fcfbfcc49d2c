//! The tier state machine: demotion and promotion with exact tier contents, moves and
//! residency events; warm-restart indexing; and a property test that replays every move on a
//! simulated physical store (a block is in exactly one place, its bytes are where the logical
//! state says, nothing leaks).

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::collections::HashMap;

use kvmesh_gpu_server_kv::{
    BlockHash, BlockManager, BlockTable, KvConfig, Move, Place, ResidencyEvent, RestoredBlock,
    Tier, block_hashes,
};
use proptest::prelude::*;

const BT: usize = 4;

fn mgr(device: usize, host: usize, disk: usize) -> BlockManager {
    BlockManager::tiered(
        KvConfig {
            block_tokens: BT,
            num_blocks: device,
        },
        host,
        disk,
    )
}

/// Adopts the cached prefix, reserves and computes the whole of `tokens`.
fn run_seq(m: &mut BlockManager, tokens: &[u32]) -> (BlockTable, usize) {
    let mut t = BlockTable::new(BT);
    let cached = t.adopt_prefix(m, tokens, tokens.len() - 1);
    t.reserve(m, tokens.len()).unwrap();
    t.commit(m, tokens, tokens.len()).unwrap();
    (t, cached)
}

fn mv(hash: BlockHash, from: Place, to: Place) -> (BlockHash, Place, Place) {
    (hash, from, to)
}

fn moves(m: &mut BlockManager) -> Vec<(BlockHash, Place, Place)> {
    m.take_moves()
        .into_iter()
        .map(|x| (x.hash, x.from, x.to))
        .collect()
}

fn added(chunk: u64, tier: Tier) -> ResidencyEvent {
    ResidencyEvent::Added { chunk, tier }
}
fn removed(chunk: u64, tier: Tier) -> ResidencyEvent {
    ResidencyEvent::Removed { chunk, tier }
}

#[test]
fn demote_down_and_promote_back_with_exact_contents() {
    use Place::{Device, Disk, Host};
    let mut m = mgr(2, 2, 2);
    let a: Vec<u32> = (0..8).collect();
    let b: Vec<u32> = (100..108).collect();
    let ha = block_hashes(&a, BT);
    let hb = block_hashes(&b, BT);

    // A fills both device blocks (ids 0, 1); chunk 11 ends in its second block.
    let (mut ta, _) = run_seq(&mut m, &a);
    assert_eq!(ta.ids(), &[0, 1]);
    m.map_chunks(ha[1], &[11]);
    ta.release(&mut m);
    assert_eq!(m.take_events(), vec![added(11, Tier::Device)]);

    // B needs both blocks: A's tail is least recently used and goes to HOST first.
    let (mut tb, cached) = run_seq(&mut m, &b);
    assert_eq!(cached, 0);
    assert_eq!(tb.ids(), &[1, 0]);
    assert_eq!(
        moves(&mut m),
        vec![mv(ha[1], Device(1), Host(0)), mv(ha[0], Device(0), Host(1))]
    );
    assert_eq!(m.tier_contents(Tier::Device), vec![(0, hb[1]), (1, hb[0])]);
    assert_eq!(m.tier_contents(Tier::Host), vec![(0, ha[1]), (1, ha[0])]);
    assert_eq!(m.tier_contents(Tier::Disk), vec![]);
    assert_eq!(
        m.take_events(),
        vec![removed(11, Tier::Device), added(11, Tier::Host)]
    );
    tb.release(&mut m);

    // A again: its first block is promoted from HOST. Making room demotes B's tail to HOST,
    // which pushes A's tail (host LRU) to DISK; the promoted block itself is pinned.
    let mut t = BlockTable::new(BT);
    let cached = t.adopt_prefix(&mut m, &a, a.len() - 1);
    assert_eq!(cached, 4);
    assert_eq!(
        moves(&mut m),
        vec![
            mv(ha[1], Host(0), Disk(0)),
            mv(hb[1], Device(0), Host(0)),
            mv(ha[0], Host(1), Device(0)),
        ]
    );
    assert_eq!(
        m.take_events(),
        vec![removed(11, Tier::Host), added(11, Tier::Disk)]
    );
    assert_eq!(m.tier_contents(Tier::Host), vec![(0, hb[1])]);
    assert_eq!(m.tier_contents(Tier::Disk), vec![(0, ha[1])]);
    // The second block is recomputed (it holds the last prompt token): reserving demotes
    // B's head; sealing the recomputed block takes over the disk copy.
    t.reserve(&mut m, a.len()).unwrap();
    t.commit(&mut m, &a, a.len()).unwrap();
    assert_eq!(moves(&mut m), vec![mv(hb[0], Device(1), Host(1))]);
    assert_eq!(m.tier_contents(Tier::Device), vec![(0, ha[0]), (1, ha[1])]);
    assert_eq!(m.tier_contents(Tier::Host), vec![(0, hb[1]), (1, hb[0])]);
    assert_eq!(m.tier_contents(Tier::Disk), vec![]);
    assert_eq!(
        m.take_events(),
        vec![removed(11, Tier::Disk), added(11, Tier::Device)]
    );
    t.release(&mut m);

    let c = m.tier_counters(Tier::Host);
    assert_eq!((c.demotions, c.promotions, c.evictions), (4, 1, 1));
    assert_eq!(m.tier_counters(Tier::Disk).demotions, 1);
    assert_eq!(m.tier_counters(Tier::Host).hits, 1);
    m.check().unwrap();
}

#[test]
fn the_last_tier_drops_its_victim_and_a_refused_fetch_is_recomputed() {
    use Place::{Device, Disk};
    // No host tier: the device demotes straight to a one-slot disk.
    let mut m = mgr(2, 0, 1);
    let a: Vec<u32> = (0..8).collect();
    let ha = block_hashes(&a, BT);
    let (mut ta, _) = run_seq(&mut m, &a);
    ta.release(&mut m);
    let (mut tb, _) = run_seq(&mut m, &[7; 8]);
    // a1 went to disk, then a0 needed the slot: a1 was dropped for good.
    assert_eq!(
        moves(&mut m),
        vec![mv(ha[1], Device(1), Disk(0)), mv(ha[0], Device(0), Disk(0))]
    );
    assert_eq!(m.tier_contents(Tier::Disk), vec![(0, ha[0])]);
    assert_eq!(m.cached_prefix(&ha), 1);
    tb.release(&mut m);
    // The cost model refuses the disk: nothing is promoted, the block will be recomputed.
    let mut t = BlockTable::new(BT);
    let before = m.tier_counters(Tier::Disk).misses;
    let cached = t.adopt_prefix_with(&mut m, &a, a.len(), &mut |p, _| p.tier() != Tier::Disk);
    assert_eq!(cached, 0);
    assert!(m.take_moves().is_empty());
    assert_eq!(m.tier_counters(Tier::Disk).misses - before, 2);
    t.release(&mut m);
    m.check().unwrap();
}

#[test]
fn warm_restart_indexes_reachable_blocks_only() {
    let mut m = mgr(4, 0, 8);
    let a: Vec<u32> = (0..12).collect();
    let h = block_hashes(&a, BT);
    let blk = |slot, i: usize, written| RestoredBlock {
        slot,
        hash: h[i],
        parent: i.checked_sub(1).map(|p| h[p]),
        chunks: vec![100 + i as u64],
        written,
    };
    let orphan = RestoredBlock {
        slot: 6,
        hash: 0xdead,
        parent: Some(0xbeef), // its parent is not on disk
        chunks: vec![999],
        written: 4,
    };
    let dup = blk(5, 1, 1);
    let n = m.restore_disk(vec![blk(3, 2, 3), blk(1, 0, 1), blk(2, 1, 2), orphan, dup]);
    assert_eq!(n, 3);
    assert_eq!(
        m.tier_contents(Tier::Disk),
        vec![(1, h[0]), (2, h[1]), (3, h[2])]
    );
    assert_eq!(m.resident_chunks(Tier::Disk), vec![100, 101, 102]);
    m.check().unwrap();
    // The restored prefix is served (promoted) like any other.
    let mut t = BlockTable::new(BT);
    assert_eq!(t.adopt_prefix(&mut m, &a, a.len() - 1), 8);
    assert_eq!(m.resident_chunks(Tier::Device), vec![100, 101]);
    t.release(&mut m);
    m.check().unwrap();
}

#[test]
fn disabling_the_disk_drops_its_blocks_and_their_descendants() {
    let mut m = mgr(2, 1, 4);
    let a: Vec<u32> = (0..8).collect();
    let ha = block_hashes(&a, BT);
    let (mut ta, _) = run_seq(&mut m, &a);
    m.map_chunks(ha[0], &[1]);
    m.map_chunks(ha[1], &[2]);
    ta.release(&mut m);
    let (mut tb, _) = run_seq(&mut m, &[9; 8]);
    tb.release(&mut m);
    // a1 went host -> disk, a0 is in host: its descendant a1 is on disk.
    assert_eq!(m.place(ha[0]), Some(Place::Host(0)));
    assert!(matches!(m.place(ha[1]), Some(Place::Disk(_))));
    m.take_events();
    m.disable_tier(Tier::Disk);
    assert_eq!(m.capacity(Tier::Disk), 0);
    assert_eq!(m.place(ha[1]), None);
    assert_eq!(m.place(ha[0]), Some(Place::Host(0)));
    assert_eq!(m.take_events(), vec![removed(2, Tier::Disk)]);
    m.check().unwrap();
}

/// A simulated physical store: which block's bytes each device block and slot holds.
#[derive(Default)]
struct Sim {
    at: HashMap<Place, BlockHash>,
}

impl Sim {
    fn apply(&mut self, moves: Vec<Move>) -> Result<(), String> {
        for mv in moves {
            match self.at.get(&mv.from) {
                Some(&h) if h == mv.hash => {}
                other => {
                    return Err(format!(
                        "move of {:x} from {:?}, which holds {other:?}",
                        mv.hash, mv.from
                    ));
                }
            }
            self.at.insert(mv.to, mv.hash);
        }
        Ok(())
    }

    /// The forward pass wrote the table's blocks: sealed ones hold their block, the rest
    /// hold partial rows (poison: no cached block may be read from them).
    fn wrote(&mut self, t: &BlockTable) {
        for (i, &id) in t.ids().iter().enumerate() {
            let h = t.hashes().get(i).copied().unwrap_or(0);
            self.at.insert(Place::Device(id), h);
        }
    }

    fn check(&self, m: &BlockManager) -> Result<(), String> {
        for tier in Tier::ALL {
            for (slot, h) in m.tier_contents(tier) {
                let place = match tier {
                    Tier::Device => Place::Device(slot),
                    Tier::Host => Place::Host(slot),
                    Tier::Disk => Place::Disk(slot),
                };
                if self.at.get(&place) != Some(&h) {
                    return Err(format!("{place:?} should hold {h:x}"));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Start(Vec<u32>, u8),
    Step(usize, usize),
    End(usize),
    Forget(usize),
    Clear,
    DisableDisk,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec(0u32..3, 1..24), any::<u8>()).prop_map(|(t, f)| Op::Start(t, f)),
        4 => (0usize..8, 1usize..6).prop_map(|(i, n)| Op::Step(i, n)),
        4 => (0usize..8).prop_map(Op::End),
        1 => (0usize..64).prop_map(Op::Forget),
        1 => Just(Op::Clear),
        1 => Just(Op::DisableDisk),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn tier_state_machine(
        ops in prop::collection::vec(op(), 1..60),
        device in 2usize..8,
        host in 0usize..5,
        disk in 0usize..5,
    ) {
        let mut m = mgr(device, host, disk);
        let mut sim = Sim::default();
        let mut live: Vec<(BlockTable, Vec<u32>)> = Vec::new();
        for op in ops {
            match op {
                Op::Start(tokens, fetch) => {
                    let mut t = BlockTable::new(BT);
                    // Which lower tiers this admission fetches from (the cost model's say).
                    t.adopt_prefix_with(&mut m, &tokens, tokens.len() - 1, &mut |p, _| match p.tier() {
                        Tier::Device => true,
                        Tier::Host => fetch & 1 == 0,
                        Tier::Disk => fetch & 2 == 0,
                    });
                    sim.apply(m.take_moves()).map_err(TestCaseError::fail)?;
                    let first = (t.computed() + 1).min(tokens.len());
                    let ok = t.reserve(&mut m, first).is_ok();
                    sim.apply(m.take_moves()).map_err(TestCaseError::fail)?;
                    if ok {
                        for (i, h) in t.commit(&mut m, &tokens, first).unwrap() {
                            m.map_chunks(h, &[h ^ i as u64]);
                        }
                        sim.wrote(&t);
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
                    let ok = t.reserve(&mut m, target).is_ok();
                    sim.apply(m.take_moves()).map_err(TestCaseError::fail)?;
                    if ok {
                        t.commit(&mut m, tokens, target).unwrap();
                        sim.wrote(t);
                    }
                }
                Op::End(i) => {
                    if live.is_empty() { continue; }
                    let (mut t, _) = live.swap_remove(i % live.len());
                    t.release(&mut m);
                }
                Op::Forget(i) => {
                    // What the engine forgets: a lower-tier copy that failed verification.
                    let all: Vec<BlockHash> = [Tier::Host, Tier::Disk]
                        .into_iter()
                        .flat_map(|t| m.tier_contents(t))
                        .map(|(_, h)| h)
                        .collect();
                    if !all.is_empty() {
                        m.forget(all[i % all.len()]);
                    }
                }
                Op::Clear => m.clear_cache(),
                Op::DisableDisk => m.disable_tier(Tier::Disk),
            }
            prop_assert_eq!(m.check(), Ok(()));
            prop_assert_eq!(sim.check(&m), Ok(()));
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
        prop_assert_eq!(s.free + s.cached, device);
        for tier in [Tier::Host, Tier::Disk] {
            let c = m.tier_counters(tier);
            prop_assert_eq!(c.used_blocks as usize, m.tier_contents(tier).len());
            prop_assert!(c.used_blocks <= c.capacity_blocks);
        }
    }
}
