//! Helpers for policy tests.

use crate::proto;
use crate::snapshot::Snapshot;

/// A pool of `n` replicas `r0..r{n-1}` at `10.0.0.{i}:8000`, idle.
pub(crate) fn pool(n: usize) -> Snapshot {
    let mut s = Snapshot::new("m", 256);
    for i in 0..n {
        s.upsert(&replica(i, 0));
    }
    s
}

pub(crate) fn replica(i: usize, queued: u64) -> proto::ReplicaInfo {
    proto::ReplicaInfo {
        id: format!("r{i}"),
        address: format!("10.0.0.{i}:8000"),
        load: Some(proto::Load {
            queued_prefill_tokens: queued,
            ..Default::default()
        }),
    }
}

/// A chain of `len` distinct chunk hashes for prefix `p` (chunks of shared
/// prefixes are equal by construction).
pub(crate) fn chain(prefix: u64, shared: usize, own: u64, len: usize) -> Vec<u64> {
    (0..len)
        .map(|i| {
            if i < shared {
                prefix * 1_000_003 + i as u64
            } else {
                (1 << 40) + own * 7_000_003 + i as u64
            }
        })
        .collect()
}
