use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

/// Shared data as Envoy keeps it: a map of byte values.
#[derive(Default)]
struct Shared(HashMap<String, Vec<u8>>);

impl Shared {
    fn write(&mut self, writes: Vec<(String, Vec<u8>)>) {
        for (k, v) in writes {
            self.0.insert(k, v);
        }
    }
    fn get(&self) -> impl FnMut(&str) -> Option<Vec<u8>> + '_ {
        |k| self.0.get(k).cloned()
    }
}

type Normal = (
    BTreeMap<String, (String, u64)>,
    BTreeMap<String, BTreeSet<(i32, u64)>>,
);

/// Order-independent form of a snapshot: members with load, and per replica
/// the set of (tier, chunk).
fn normal(s: &Snapshot) -> Normal {
    let p = s.to_proto();
    let members = p
        .replicas
        .iter()
        .map(|r| {
            let q = r.load.as_ref().map_or(0, |l| l.queued_prefill_tokens);
            (r.id.clone(), (r.address.clone(), q))
        })
        .collect();
    let res = p
        .residency
        .iter()
        .map(|r| {
            let set = r
                .resident
                .iter()
                .flat_map(|t| t.chunks.iter().map(move |&c| (t.tier, c)))
                .collect();
            (r.replica_id.clone(), set)
        })
        .collect();
    (members, res)
}

fn pool_state(ids: &[(usize, u64)]) -> proto::PoolState {
    proto::PoolState {
        pool: "p".into(),
        model: "m".into(),
        chunk_bytes: 256,
        replicas: ids
            .iter()
            .map(|&(i, q)| proto::ReplicaInfo {
                id: format!("r{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                load: Some(proto::Load {
                    queued_prefill_tokens: q,
                    ..Default::default()
                }),
            })
            .collect(),
    }
}

fn shard(replica: usize, shard: u32, chunks: &[(i32, u64)]) -> proto::ResidencyShard {
    let mut by_tier: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for &(t, c) in chunks {
        by_tier.entry(t).or_default().push(c);
    }
    proto::ResidencyShard {
        pool: "p".into(),
        replica_id: format!("r{replica}"),
        shard,
        shard_count: 4,
        resident: by_tier
            .into_iter()
            .map(|(tier, chunks)| proto::TierChunks { tier, chunks })
            .collect(),
    }
}

#[test]
fn reader_without_head_keeps_its_initial_snapshot() {
    let mut initial = Snapshot::new("m", 256);
    initial.upsert(&pool_state(&[(1, 0)]).replicas[0]);
    let mut r = StateReader::new("p", initial);
    let shared = Shared::default();
    assert_eq!(r.refresh(shared.get()).unwrap(), Refresh::Unchanged);
    assert!(r.snapshot().find("r1").is_some());
}

#[test]
fn first_refresh_loads_then_applies_only_new_deltas() {
    let mut shared = Shared::default();
    let mut w = StateWriter::new("p", 7);
    w.set_pool_state(&pool_state(&[(0, 0), (1, 5)]));
    w.set_shard(&shard(0, 0, &[(1, 10), (2, 11)]));
    shared.write(w.flush());
    let mut r = StateReader::new("p", Snapshot::default());
    assert_eq!(r.refresh(shared.get()).unwrap(), Refresh::Reloaded);
    assert_eq!(r.refresh(shared.get()).unwrap(), Refresh::Unchanged);
    w.set_shard(&shard(0, 0, &[(1, 10)]));
    w.set_pool_state(&pool_state(&[(0, 3)]));
    shared.write(w.flush());
    assert_eq!(r.refresh(shared.get()).unwrap(), Refresh::Deltas(1));
    assert_eq!(
        normal(r.snapshot()),
        normal(&Snapshot::from_proto(&w.snapshot()))
    );
    assert!(r.snapshot().find("r1").is_none());
    assert_eq!(r.snapshot().holders(11).len(), 0);
}

#[test]
fn nothing_changed_writes_nothing() {
    let mut w = StateWriter::new("p", 1);
    w.set_pool_state(&pool_state(&[(0, 0)]));
    assert!(!w.flush().is_empty());
    w.set_pool_state(&pool_state(&[(0, 0)]));
    w.set_shard(&shard(0, 1, &[]));
    assert!(w.flush().is_empty());
    // Added then removed within one flush window cancels out.
    w.set_shard(&shard(0, 1, &[(1, 5)]));
    w.set_shard(&shard(0, 1, &[]));
    assert!(w.flush().is_empty());
}

#[test]
fn head_is_written_last_and_small() {
    let mut w = StateWriter::new("p", 1);
    w.set_pool_state(&pool_state(&[(0, 0)]));
    w.set_shard(&shard(0, 0, &(0..1000).map(|c| (1, c)).collect::<Vec<_>>()));
    let writes = w.flush();
    let (k, v) = writes.last().unwrap();
    assert_eq!(k, &head_key("p"));
    assert!(v.len() < 32, "head is {} bytes", v.len());
}

#[test]
fn a_restarted_writer_forces_a_reload() {
    let mut shared = Shared::default();
    let mut w = StateWriter::new("p", 1);
    w.set_pool_state(&pool_state(&[(0, 0), (1, 0)]));
    shared.write(w.flush());
    let mut r = StateReader::new("p", Snapshot::default());
    r.refresh(shared.get()).unwrap();
    let mut w2 = StateWriter::new("p", 2);
    w2.set_pool_state(&pool_state(&[(2, 0)]));
    shared.write(w2.flush());
    assert_eq!(r.refresh(shared.get()).unwrap(), Refresh::Reloaded);
    assert_eq!(r.snapshot().len(), 1);
    assert!(r.snapshot().find("r2").is_some());
}

#[test]
fn corrupt_head_is_an_error_and_the_view_stays() {
    let mut shared = Shared::default();
    let mut w = StateWriter::new("p", 1);
    w.set_pool_state(&pool_state(&[(0, 0)]));
    shared.write(w.flush());
    let mut r = StateReader::new("p", Snapshot::default());
    r.refresh(shared.get()).unwrap();
    shared.0.insert(head_key("p"), vec![0xff, 0xff, 0xff]);
    assert!(r.refresh(shared.get()).is_err());
    assert!(r.snapshot().find("r0").is_some());
}

#[derive(Debug, Clone)]
enum Op {
    Members(Vec<(usize, u64)>),
    Shard(usize, u32, Vec<(i32, u64)>),
    Flush,
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => proptest::collection::vec((0usize..5, 0u64..100), 0..5).prop_map(Op::Members),
        3 => (0usize..5, 0u32..3, proptest::collection::vec((1i32..4, 0u64..40), 0..12))
            .prop_map(|(r, s, c)| Op::Shard(r, s, c)),
        3 => Just(Op::Flush),
        2 => (0usize..3).prop_map(Op::Read),
    ]
}

proptest! {
    /// Readers that refresh at arbitrary moments (and so fall behind the ring
    /// at times) always end up with exactly the writer's state.
    #[test]
    fn readers_converge_on_the_writer(ops in proptest::collection::vec(op(), 1..150)) {
        let mut shared = Shared::default();
        let mut w = StateWriter::new("p", 42).with_ring(4, 2);
        let mut readers: Vec<StateReader> =
            (0..3).map(|_| StateReader::new("p", Snapshot::default())).collect();
        for op in ops {
            match op {
                Op::Members(m) => {
                    let mut m = m;
                    m.sort();
                    m.dedup_by_key(|x| x.0);
                    w.set_pool_state(&pool_state(&m));
                }
                Op::Shard(r, s, chunks) => {
                    // Only chunks of this shard, as the control plane sends.
                    let c: Vec<_> = chunks.into_iter().filter(|&(_, c)| c % 3 == u64::from(s)).collect();
                    w.set_shard(&shard(r, s, &c));
                }
                Op::Flush => {
                    shared.write(w.flush());
                    // The cached encoding is byte for byte the message's.
                    prop_assert_eq!(w.encoded_snapshot(), w.snapshot().encode_to_vec());
                }
                Op::Read(i) => {
                    readers[i].refresh(shared.get()).unwrap();
                }
            }
        }
        shared.write(w.flush());
        // The writer's view of members drops shards of removed replicas.
        let expected = normal(&Snapshot::from_proto(&w.snapshot()));
        for r in &mut readers {
            r.refresh(shared.get()).unwrap();
            prop_assert_eq!(normal(r.snapshot()), expected.clone());
        }
    }
}
