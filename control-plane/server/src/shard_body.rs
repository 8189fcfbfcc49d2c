//! A `ResidencyShard` resource that shares the registry's chunk lists and is
//! encoded only when a stream sends it. Holding every shard encoded for delta
//! xDS doubled the residency memory (8 bytes a chunk in the sorted lists, 8
//! more as `fixed64` in the encoding: about 80 MB each at 10 M chunks).

use std::sync::Arc;

use kvmesh_control_plane_xds::LazyBody;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// One shard of one replica: an immutable view of its sorted lists per tier.
#[derive(Debug, Clone)]
pub struct ShardBody {
    pub pool: Arc<str>,
    pub replica_id: Arc<str>,
    pub shard: u32,
    pub shard_count: u32,
    /// (tier, chunks sorted ascending), by tier.
    pub tiers: Vec<(i32, Arc<Vec<u64>>)>,
}

// Field numbers of `kvmesh.v1.ResidencyShard` and `kvmesh.v1.TierChunks`
// (plugins/sdk/proto/kvmesh/v1/state.proto); the tests compare the output with
// prost's encoding of the generated messages.
const POOL: u32 = 1;
const REPLICA_ID: u32 = 2;
const SHARD: u32 = 3;
const SHARD_COUNT: u32 = 4;
const RESIDENT: u32 = 5;
const TIER: u32 = 1;
const CHUNKS: u32 = 2;

fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.extend_from_slice(s.as_bytes());
}

fn str_len(tag: u32, s: &str) -> usize {
    key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
}

fn tier_len(tier: i32, chunks: &[u64]) -> usize {
    let mut n = 0;
    if tier != 0 {
        n += prost::encoding::int32::encoded_len(TIER, &tier);
    }
    n + prost::encoding::fixed64::encoded_len_packed(CHUNKS, chunks)
}

impl ShardBody {
    /// A version that changes whenever the encoding does (xxh3 of the content).
    pub fn version(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(self.pool.as_bytes());
        h.update(&[0]);
        h.update(self.replica_id.as_bytes());
        h.update(&[0]);
        h.update(&self.shard.to_le_bytes());
        h.update(&self.shard_count.to_le_bytes());
        for (tier, chunks) in &self.tiers {
            h.update(&tier.to_le_bytes());
            h.update(&(chunks.len() as u64).to_le_bytes());
            for c in chunks.iter() {
                h.update(&c.to_le_bytes());
            }
        }
        format!("{:016x}", h.digest())
    }
}

impl LazyBody for ShardBody {
    fn encode(&self) -> Vec<u8> {
        use prost::encoding::{fixed64, int32, uint32};
        let mut buf = Vec::with_capacity(self.encoded_len());
        if !self.pool.is_empty() {
            put_str(POOL, &self.pool, &mut buf);
        }
        if !self.replica_id.is_empty() {
            put_str(REPLICA_ID, &self.replica_id, &mut buf);
        }
        if self.shard != 0 {
            uint32::encode(SHARD, &self.shard, &mut buf);
        }
        if self.shard_count != 0 {
            uint32::encode(SHARD_COUNT, &self.shard_count, &mut buf);
        }
        for (tier, chunks) in &self.tiers {
            encode_key(RESIDENT, WireType::LengthDelimited, &mut buf);
            encode_varint(tier_len(*tier, chunks) as u64, &mut buf);
            if *tier != 0 {
                int32::encode(TIER, tier, &mut buf);
            }
            fixed64::encode_packed(CHUNKS, chunks, &mut buf);
        }
        buf
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::uint32;
        let mut n = 0;
        if !self.pool.is_empty() {
            n += str_len(POOL, &self.pool);
        }
        if !self.replica_id.is_empty() {
            n += str_len(REPLICA_ID, &self.replica_id);
        }
        if self.shard != 0 {
            n += uint32::encoded_len(SHARD, &self.shard);
        }
        if self.shard_count != 0 {
            n += uint32::encoded_len(SHARD_COUNT, &self.shard_count);
        }
        for (tier, chunks) in &self.tiers {
            let len = tier_len(*tier, chunks);
            n += key_len(RESIDENT) + encoded_len_varint(len as u64) + len;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_plugins_sdk::proto::{ResidencyShard, TierChunks};
    use proptest::prelude::*;
    use prost::Message;

    fn message(b: &ShardBody) -> ResidencyShard {
        ResidencyShard {
            pool: b.pool.to_string(),
            replica_id: b.replica_id.to_string(),
            shard: b.shard,
            shard_count: b.shard_count,
            resident: b
                .tiers
                .iter()
                .map(|(tier, chunks)| TierChunks {
                    tier: *tier,
                    chunks: chunks.to_vec(),
                })
                .collect(),
        }
    }

    proptest! {
        /// Byte for byte what prost encodes for the generated message.
        #[test]
        fn encodes_like_the_generated_message(
            pool in "[a-z]{0,8}",
            id in "[a-z0-9-]{0,12}",
            shard in 0u32..20,
            count in 0u32..20,
            tiers in proptest::collection::vec(
                (0i32..4, proptest::collection::vec(any::<u64>(), 0..40)), 0..4),
        ) {
            let b = ShardBody {
                pool: pool.into(),
                replica_id: id.into(),
                shard,
                shard_count: count,
                tiers: tiers.into_iter().map(|(t, c)| (t, Arc::new(c))).collect(),
            };
            let want = message(&b).encode_to_vec();
            prop_assert_eq!(b.encoded_len(), want.len());
            prop_assert_eq!(b.encode(), want);
        }
    }

    #[test]
    fn version_follows_content() {
        let b = ShardBody {
            pool: "p".into(),
            replica_id: "r".into(),
            shard: 1,
            shard_count: 4,
            tiers: vec![(1, Arc::new(vec![1, 5]))],
        };
        let mut c = b.clone();
        assert_eq!(b.version(), c.version());
        c.tiers = vec![(1, Arc::new(vec![1, 9]))];
        assert_ne!(b.version(), c.version());
        c.tiers = vec![(2, Arc::new(vec![1, 5]))];
        assert_ne!(b.version(), c.version());
    }
}
