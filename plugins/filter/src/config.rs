//! The plugin configuration (JSON), checked once in `on_configure`.

use kvmesh_plugins_sdk::chunk::{DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES};
use kvmesh_plugins_sdk::proto::{self, Tier};
use kvmesh_plugins_sdk::snapshot::Snapshot;
use serde::Deserialize;

/// Bodies larger than this are not parsed by default (routed by fallback).
/// Envoy's `per_connection_buffer_limit_bytes` must be larger (see envoy/).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// What a filter instance is told by Envoy (or by ECDS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Pool name: selects the shared-data keys of its live state.
    pub pool: String,
    /// Strategy parameters (see the SDK's policy configs); `null` = defaults.
    #[serde(default)]
    pub strategy: serde_json::Value,
    /// Text chunk size until the live state says otherwise.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Largest body parsed for routing.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Add `x-kvmesh-decision` to responses.
    #[serde(default = "yes")]
    pub decision_header: bool,
    /// Initial replicas (static deployments and tests); live state from the
    /// state pump replaces them when it arrives.
    #[serde(default)]
    pub replicas: Vec<StaticReplica>,
}

/// A replica given in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticReplica {
    /// `host:port` Envoy sends to (an endpoint of the pool cluster).
    pub address: String,
    /// Identity; defaults to the address.
    #[serde(default)]
    pub id: Option<String>,
    /// Requests queued, not started.
    #[serde(default)]
    pub waiting: u32,
    /// Requests running.
    #[serde(default)]
    pub running: u32,
    /// Prompt tokens admitted but not yet prefilled.
    #[serde(default)]
    pub queued_prefill_tokens: u64,
    /// Chunk hashes held in the device tier.
    #[serde(default)]
    pub device: Vec<u64>,
    /// Chunk hashes held in the host tier.
    #[serde(default)]
    pub host: Vec<u64>,
    /// Chunk hashes held in the disk tier.
    #[serde(default)]
    pub disk: Vec<u64>,
}

fn default_chunk_bytes() -> u32 {
    DEFAULT_CHUNK_BYTES
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn yes() -> bool {
    true
}

impl FilterConfig {
    /// Parses and checks a configuration.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = if bytes.iter().all(u8::is_ascii_whitespace) {
            &b"{}"[..]
        } else {
            bytes
        };
        let config: FilterConfig =
            serde_json::from_slice(text).map_err(|e| format!("invalid configuration: {e}"))?;
        if config.pool.is_empty() {
            return Err("`pool` must not be empty".into());
        }
        if config.chunk_bytes < MIN_CHUNK_BYTES {
            return Err(format!("`chunk_bytes` must be >= {MIN_CHUNK_BYTES}"));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &config.replicas {
            if r.address.is_empty() {
                return Err("a replica has an empty `address`".into());
            }
            if !seen.insert(r.id.as_deref().unwrap_or(&r.address)) {
                return Err(format!("replica {:?} listed twice", r.address));
            }
        }
        Ok(config)
    }

    /// The initial pool view from the static replicas.
    pub fn initial_snapshot(&self) -> Snapshot {
        let mut s = Snapshot::new("", self.chunk_bytes);
        for r in &self.replicas {
            let id = r.id.clone().unwrap_or_else(|| r.address.clone());
            s.upsert(&proto::ReplicaInfo {
                id: id.clone(),
                address: r.address.clone(),
                load: Some(proto::Load {
                    waiting: r.waiting,
                    running: r.running,
                    queued_prefill_tokens: r.queued_prefill_tokens,
                    kv: Vec::new(),
                }),
            });
            s.add_resident(&id, Tier::Device as i32, &r.device);
            s.add_resident(&id, Tier::Host as i32, &r.host);
            s.add_resident(&id, Tier::Disk as i32, &r.disk);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_static_replicas() {
        let c = FilterConfig::parse(
            br#"{"pool":"p","replicas":[{"address":"127.0.0.1:1","device":[1,18446744073709551615]},{"address":"127.0.0.1:2","id":"b","queued_prefill_tokens":9}]}"#,
        )
        .unwrap();
        assert_eq!(c.chunk_bytes, 256);
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let s = c.initial_snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s.holders(u64::MAX).len(), 1);
        assert_eq!(s.find("b").unwrap().1.load.queued_prefill_tokens, 9);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        for (cfg, why) in [
            (&b""[..], "pool"),
            (b"{}", "pool"),
            (b"{\"pool\":\"\"}", "pool"),
            (b"{\"pool\":\"p\",\"chunk_bytes\":0}", "chunk_bytes"),
            (b"{\"pool\":\"p\",\"typo\":1}", "typo"),
            (b"not json", "invalid"),
            (
                b"{\"pool\":\"p\",\"replicas\":[{\"address\":\"a\"},{\"address\":\"a\"}]}",
                "twice",
            ),
        ] {
            let err = FilterConfig::parse(cfg).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
