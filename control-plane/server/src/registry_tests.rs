use super::*;
use kvmesh_plugins_sdk::proto::{AllCleared, ResidencyDelta, ResidencySnapshot, TierUsage};
use proptest::prelude::*;

fn config() -> Arc<Config> {
    let yaml =
        "residency_shards: 4\npools:\n  - { name: p, model: m, listener: '127.0.0.1:10000' }\n";
    let c: Config = serde_yaml::from_str(yaml).expect("config");
    Arc::new(c)
}

fn ev(e: replica_report::Event) -> ReplicaReport {
    ReplicaReport { event: Some(e) }
}

fn register(id: &str) -> ReplicaReport {
    ev(replica_report::Event::Register(Register {
        replica_id: id.into(),
        address: "127.0.0.1:9000".into(),
        model: "m".into(),
        block_tokens: 16,
        chunk_bytes: 256,
        capacity: vec![],
    }))
}

fn tc(tier: Tier, chunks: &[u64]) -> TierChunks {
    TierChunks {
        tier: tier as i32,
        chunks: chunks.to_vec(),
    }
}

fn snapshot(seq: u64, chunks: &[u64]) -> ReplicaReport {
    ev(replica_report::Event::Snapshot(ResidencySnapshot {
        seq,
        resident: vec![tc(Tier::Device, chunks)],
    }))
}

fn delta(seq: u64, added: &[u64], removed: &[u64]) -> ReplicaReport {
    ev(replica_report::Event::Delta(ResidencyDelta {
        seq,
        added: vec![tc(Tier::Device, added)],
        removed: vec![tc(Tier::Device, removed)],
    }))
}

fn registered(reg: &mut Registry, id: &str) -> StreamCtx {
    let mut ctx = reg.open_stream();
    assert_eq!(
        reg.apply(&mut ctx, register(id), Instant::now()),
        Ok(Applied::Registered(id.into()))
    );
    ctx
}

#[test]
fn register_snapshot_delta_and_gap() {
    let mut reg = Registry::new(config());
    let mut ctx = registered(&mut reg, "r1");
    let now = Instant::now();
    assert!(matches!(
        reg.apply(&mut ctx, delta(1, &[1], &[]), now),
        Ok(Applied::Resync(_))
    ));
    assert_eq!(
        reg.apply(&mut ctx, snapshot(1, &[1, 2, 3]), now),
        Ok(Applied::Ok)
    );
    assert_eq!(
        reg.apply(&mut ctx, delta(2, &[4], &[1]), now),
        Ok(Applied::Ok)
    );
    assert_eq!(reg.get("r1").expect("r1").resident_chunks(), 3);
    // A gap asks for a resync and the delta is not applied.
    assert!(matches!(
        reg.apply(&mut ctx, delta(5, &[9], &[]), now),
        Ok(Applied::Resync(_))
    ));
    assert_eq!(reg.get("r1").expect("r1").resident_chunks(), 3);
    let cleared = ev(replica_report::Event::Cleared(AllCleared { seq: 6 }));
    assert_eq!(reg.apply(&mut ctx, cleared, now), Ok(Applied::Ok));
    assert_eq!(reg.get("r1").expect("r1").resident_chunks(), 0);
    assert_eq!(
        reg.apply(&mut ctx, delta(7, &[1], &[]), now),
        Ok(Applied::Ok)
    );
}

#[test]
fn malformed_reports_are_rejected_and_change_nothing() {
    let mut reg = Registry::new(config());
    let now = Instant::now();
    let mut fresh = reg.open_stream();
    assert_eq!(
        reg.apply(&mut fresh, snapshot(1, &[1]), now),
        Err(Rejection::NotRegistered)
    );
    let mut bad = register("x");
    if let Some(replica_report::Event::Register(r)) = &mut bad.event {
        r.model = "unknown".into();
    }
    assert!(matches!(
        reg.apply(&mut fresh, bad, now),
        Err(Rejection::BadRegister(_))
    ));
    let mut bad_addr = register("x");
    if let Some(replica_report::Event::Register(r)) = &mut bad_addr.event {
        r.address = "not an address".into();
    }
    assert!(matches!(
        reg.apply(&mut fresh, bad_addr, now),
        Err(Rejection::BadRegister(_))
    ));
    assert_eq!(reg.replicas().count(), 0);

    let mut ctx = registered(&mut reg, "r1");
    reg.apply(&mut ctx, snapshot(1, &[1, 2]), now)
        .expect("snapshot");
    let before = (reg.generation, reg.get("r1").expect("r1").resident_chunks());
    let bad_tier = ev(replica_report::Event::Delta(ResidencyDelta {
        seq: 2,
        added: vec![TierChunks {
            tier: 42,
            chunks: vec![7],
        }],
        removed: vec![],
    }));
    assert_eq!(
        reg.apply(&mut ctx, bad_tier, now),
        Err(Rejection::BadTier(42))
    );
    assert_eq!(
        reg.apply(&mut ctx, ReplicaReport { event: None }, now),
        Err(Rejection::Empty)
    );
    assert_eq!(
        reg.apply(&mut ctx, register("r1"), now),
        Err(Rejection::Reregister)
    );
    let over = ev(replica_report::Event::Load(Load {
        kv: vec![TierUsage {
            tier: Tier::Device as i32,
            used_blocks: 5,
            capacity_blocks: 4,
        }],
        ..Default::default()
    }));
    assert!(matches!(
        reg.apply(&mut ctx, over, now),
        Err(Rejection::OverCapacity { .. })
    ));
    assert_eq!(
        before,
        (reg.generation, reg.get("r1").expect("r1").resident_chunks())
    );
    // The seq was not consumed by the refused delta.
    assert_eq!(
        reg.apply(&mut ctx, delta(2, &[3], &[]), now),
        Ok(Applied::Ok)
    );
}

#[tokio::test(start_paused = true)]
async fn silent_replicas_expire_and_reconnects_keep_residency() {
    let mut reg = Registry::new(config());
    let mut ctx = registered(&mut reg, "r1");
    reg.apply(&mut ctx, snapshot(1, &[1, 2]), Instant::now())
        .expect("snapshot");
    reg.close_stream(&ctx);
    // Reconnect: residency kept until the new snapshot.
    let _ctx2 = registered(&mut reg, "r1");
    assert_eq!(reg.get("r1").expect("r1").resident_chunks(), 2);
    // The old stream cannot write any more.
    assert_eq!(
        reg.apply(&mut ctx, delta(2, &[3], &[]), Instant::now()),
        Err(Rejection::NotRegistered)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        reg.expire(Instant::now(), Duration::from_secs(3))
            .is_empty()
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        reg.expire(Instant::now(), Duration::from_secs(3)),
        vec!["r1".to_string()]
    );
    assert!(reg.members("p").is_empty());
}

#[test]
fn shard_resources_cover_residency_exactly() {
    let mut reg = Registry::new(config());
    let mut ctx = registered(&mut reg, "r1");
    reg.apply(&mut ctx, snapshot(1, &[0, 1, 2, 3, 4, 5]), Instant::now())
        .expect("snapshot");
    let r = reg.replicas_mut().next().expect("r1");
    let names: Vec<String> = r.shard_resources().map(|x| x.name.clone()).collect();
    assert_eq!(names, vec!["p/r1/0", "p/r1/1", "p/r1/2", "p/r1/3"]);
}

#[test]
fn published_shards_keep_their_content_while_the_registry_changes() {
    let mut reg = Registry::new(config());
    let mut ctx = registered(&mut reg, "r1");
    reg.apply(&mut ctx, snapshot(1, &[0, 4, 8]), Instant::now())
        .expect("snapshot");
    let r = reg.replicas_mut().next().expect("r1");
    let before: Vec<Arc<Resource>> = r.shard_resources().cloned().collect();
    let body_before = before[0].body();
    reg.apply(&mut ctx, delta(2, &[12], &[4]), Instant::now())
        .expect("delta");
    // What a snapshot already holds (and may still be sending) is unchanged.
    assert_eq!(before[0].body(), body_before);
    let r = reg.replicas_mut().next().expect("r1");
    let after: Vec<Arc<Resource>> = r.shard_resources().cloned().collect();
    assert_eq!(after[0].name, before[0].name);
    assert_ne!(after[0].version, before[0].version);
    let shard: kvmesh_plugins_sdk::proto::ResidencyShard =
        prost::Message::decode(after[0].body().value.as_slice()).expect("decode");
    assert_eq!(shard.resident[0].chunks, vec![0, 8, 12]);
}

proptest! {
    /// Residency after any sequence of deltas equals a plain set model, and
    /// the shard resources hold exactly those chunks.
    #[test]
    fn residency_matches_model(ops in proptest::collection::vec(
        (proptest::collection::vec(0u64..40, 0..8), proptest::collection::vec(0u64..40, 0..8)), 1..20)) {
        let mut reg = Registry::new(config());
        let mut ctx = registered(&mut reg, "r1");
        reg.apply(&mut ctx, snapshot(1, &[]), Instant::now()).expect("snapshot");
        let mut model = BTreeSet::new();
        for (i, (added, removed)) in ops.iter().enumerate() {
            reg.apply(&mut ctx, delta(i as u64 + 2, added, removed), Instant::now()).expect("delta");
            for c in removed { model.remove(c); }
            for c in added { model.insert(*c); }
        }
        let r = reg.replicas_mut().next().expect("r1");
        prop_assert_eq!(r.resident_chunks(), model.len());
        let mut seen = BTreeSet::new();
        for res in r.shard_resources() {
            let shard: kvmesh_plugins_sdk::proto::ResidencyShard = prost::Message::decode(res.body().value.as_slice()).expect("decode");
            for t in shard.resident {
                for c in t.chunks {
                    prop_assert_eq!(c % 4, u64::from(shard.shard));
                    seen.insert(c);
                }
            }
        }
        prop_assert_eq!(seen, model);
    }
}
