//! The pump's logic apart from the proxy-wasm ABI: configuration, the stream
//! lifecycle (open on a tick, reopen with backoff), coalescing changes into
//! one shared-data flush at most every `flush_ms`, one `StateWriter` per pool.

use std::collections::BTreeMap;

use kvmesh_plugins_sdk::state::StateWriter;
use serde::Deserialize;

use crate::client::{Change, Client, Limits};

/// Plugin configuration (JSON).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PumpConfig {
    /// Envoy cluster of the control plane's gRPC server.
    pub cluster: String,
    /// Node id sent to the control plane.
    #[serde(default = "default_node")]
    pub node_id: String,
    /// Shared-data writes happen at most this often.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// Largest delta xDS response accepted.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Most resources held per type.
    #[serde(default = "default_max_resources")]
    pub max_resources: usize,
    /// Delay before reopening a failed stream (doubles up to 5 s).
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// Deltas kept in shared data. A filter that falls further behind reloads
    /// the whole snapshot (tens of MB at 256 replicas x 10,000 chunks) inside
    /// a request, so the ring spans many seconds of flushes.
    #[serde(default = "default_ring")]
    pub ring: u32,
    /// A snapshot is written after this many deltas (< `ring`).
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u32,
}

fn default_node() -> String {
    "kvmesh-gateway".into()
}
fn default_flush_ms() -> u64 {
    20
}
fn default_max_message() -> usize {
    Limits::default().max_message_bytes
}
fn default_max_resources() -> usize {
    Limits::default().max_resources
}
fn default_retry_ms() -> u64 {
    200
}
fn default_ring() -> u32 {
    1024
}
fn default_snapshot_every() -> u32 {
    256
}

impl PumpConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let c: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid state pump config: {e}"))?;
        if c.cluster.is_empty() {
            return Err("invalid state pump config: cluster is empty".into());
        }
        if c.flush_ms == 0 || c.max_message_bytes == 0 {
            return Err(
                "invalid state pump config: flush_ms and max_message_bytes must be > 0".into(),
            );
        }
        if c.snapshot_every == 0 || c.snapshot_every >= c.ring {
            return Err("invalid state pump config: snapshot_every must be > 0 and < ring".into());
        }
        Ok(c)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_resources: self.max_resources,
        }
    }
}

/// Where the stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Not open; may open at `retry_at_ms`.
    Closed {
        retry_at_ms: u64,
        failures: u32,
    },
    Open {
        token: u32,
    },
}

/// Everything the pump keeps between callbacks.
#[derive(Debug)]
pub struct Pump {
    pub config: PumpConfig,
    pub client: Client,
    pub stream: Stream,
    writers: BTreeMap<String, StateWriter>,
    epoch: u64,
    last_flush_ms: u64,
    dirty: bool,
    pub flushes: u64,
}

impl Pump {
    /// `epoch` must differ between pump instances writing the same shared data
    /// (a start time in ns does).
    pub fn new(config: PumpConfig, epoch: u64) -> Self {
        let client = Client::new(config.node_id.clone(), config.limits());
        Self {
            config,
            client,
            stream: Stream::Closed {
                retry_at_ms: 0,
                failures: 0,
            },
            writers: BTreeMap::new(),
            epoch,
            last_flush_ms: 0,
            dirty: false,
            flushes: 0,
        }
    }

    /// Whether a tick at `now_ms` should open the stream.
    pub fn should_open(&self, now_ms: u64) -> bool {
        matches!(self.stream, Stream::Closed { retry_at_ms, .. } if now_ms >= retry_at_ms)
    }

    pub fn opened(&mut self, token: u32) {
        self.stream = Stream::Open { token };
    }

    /// The stream failed (or could not open) at `now_ms`.
    pub fn closed(&mut self, now_ms: u64) {
        let failures = match self.stream {
            Stream::Closed { failures, .. } => failures.saturating_add(1),
            Stream::Open { .. } => 1,
        };
        let delay = self
            .config
            .retry_ms
            .saturating_mul(1 << (failures - 1).min(5))
            .min(5_000);
        self.stream = Stream::Closed {
            retry_at_ms: now_ms + delay,
            failures,
        };
    }

    fn writer(&mut self, pool: &str) -> &mut StateWriter {
        let epoch = self.epoch;
        let (ring, every) = (self.config.ring, self.config.snapshot_every);
        self.writers
            .entry(pool.to_owned())
            .or_insert_with(|| StateWriter::new(pool, epoch).with_ring(ring, every))
    }

    /// Takes in the changes of one applied response.
    pub fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Pool {
                    name,
                    state: Some(state),
                } => self.writer(&name).set_pool_state(&state),
                Change::Pool { name, state: None } => {
                    // The pool is gone: publish it empty.
                    self.writer(&name)
                        .set_pool_state(&kvmesh_plugins_sdk::proto::PoolState {
                            pool: name.clone(),
                            ..Default::default()
                        });
                }
                Change::Shard {
                    pool,
                    shard: Some(shard),
                    ..
                } => self.writer(&pool).set_shard(&shard),
                Change::Shard {
                    name,
                    pool,
                    shard: None,
                } => {
                    let mut parts = name.rsplitn(3, '/');
                    let shard = parts.next().and_then(|s| s.parse::<u32>().ok());
                    let replica = parts.next();
                    if let (Some(shard), Some(replica)) = (shard, replica) {
                        self.writer(&pool).remove_shard(replica, shard);
                    }
                }
            }
            self.dirty = true;
        }
    }

    /// The shared-data writes due at `now_ms` (head keys last per pool), or
    /// nothing when the last flush was less than `flush_ms` ago.
    pub fn flush_due(&mut self, now_ms: u64) -> Vec<(String, Vec<u8>)> {
        if !self.dirty || now_ms.saturating_sub(self.last_flush_ms) < self.config.flush_ms {
            return Vec::new();
        }
        self.dirty = false;
        self.last_flush_ms = now_ms;
        self.flushes += 1;
        self.writers
            .values_mut()
            .flat_map(StateWriter::flush)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_plugins_sdk::proto::{
        PoolState, ReplicaInfo, ResidencyShard, StateHead, Tier, TierChunks,
    };
    use kvmesh_plugins_sdk::state::head_key;
    use prost::Message;

    fn config() -> PumpConfig {
        PumpConfig::parse(br#"{"cluster": "cp"}"#).expect("config")
    }

    #[test]
    fn config_defaults_and_errors() {
        let c = config();
        assert_eq!((c.flush_ms, c.node_id.as_str()), (20, "kvmesh-gateway"));
        assert_eq!((c.ring, c.snapshot_every), (1024, 256));
        assert!(PumpConfig::parse(b"{}").is_err());
        assert!(
            PumpConfig::parse(br#"{"cluster": "cp", "ring": 8, "snapshot_every": 8}"#).is_err()
        );
        assert!(PumpConfig::parse(br#"{"cluster": "cp", "bogus": 1}"#).is_err());
        assert!(PumpConfig::parse(b"not json").is_err());
    }

    #[test]
    fn coalesces_writes_to_one_flush_per_period() {
        let mut p = Pump::new(config(), 7);
        let state = PoolState {
            pool: "p".into(),
            model: "m".into(),
            chunk_bytes: 256,
            replicas: vec![ReplicaInfo {
                id: "r1".into(),
                address: "127.0.0.1:1".into(),
                load: None,
            }],
        };
        p.apply(vec![Change::Pool {
            name: "p".into(),
            state: Some(state),
        }]);
        let writes = p.flush_due(1_000);
        assert_eq!(writes.last().map(|w| w.0.clone()), Some(head_key("p")));
        let head = StateHead::decode(writes.last().expect("head").1.as_slice()).expect("head");
        assert_eq!((head.epoch, head.seq, head.ring), (7, 1, 1024));
        // More changes within the period wait for the next one.
        let shard = ResidencyShard {
            pool: "p".into(),
            replica_id: "r1".into(),
            shard: 0,
            shard_count: 1,
            resident: vec![TierChunks {
                tier: Tier::Device as i32,
                chunks: vec![1, 2],
            }],
        };
        p.apply(vec![Change::Shard {
            name: "p/r1/0".into(),
            pool: "p".into(),
            shard: Some(shard),
        }]);
        assert!(p.flush_due(1_010).is_empty());
        let writes = p.flush_due(1_020);
        let head = StateHead::decode(writes.last().expect("head").1.as_slice()).expect("head");
        assert_eq!(head.seq, 2);
        assert!(p.flush_due(5_000).is_empty(), "nothing changed");
        p.apply(vec![Change::Shard {
            name: "p/r1/0".into(),
            pool: "p".into(),
            shard: None,
        }]);
        assert!(!p.flush_due(6_000).is_empty());
    }

    #[test]
    fn reopens_with_growing_backoff() {
        let mut p = Pump::new(config(), 1);
        assert!(p.should_open(0));
        p.opened(3);
        assert!(!p.should_open(10));
        p.closed(1_000);
        assert!(!p.should_open(1_100));
        assert!(p.should_open(1_200));
        p.closed(1_200);
        assert_eq!(
            p.stream,
            Stream::Closed {
                retry_at_ms: 1_600,
                failures: 2
            }
        );
    }
}
