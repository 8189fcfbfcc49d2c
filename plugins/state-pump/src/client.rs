//! The pump's delta xDS client, without I/O: builds the subscription
//! requests (with the versions held, so a reconnect resyncs only what
//! changed), applies responses atomically and answers each with an ACK, or a
//! NACK that names what was wrong (and then nothing of it is applied).

use std::collections::BTreeMap;

use kvmesh_plugins_sdk::proto::{PoolState, ResidencyShard};
use prost::Message;

use crate::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, RpcStatus};

pub const POOL_STATE: &str = "type.googleapis.com/kvmesh.v1.PoolState";
pub const RESIDENCY_SHARD: &str = "type.googleapis.com/kvmesh.v1.ResidencyShard";

/// gRPC status code INVALID_ARGUMENT, sent in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Bounds on what the control plane may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest response accepted; a larger one resets the stream.
    pub max_message_bytes: usize,
    /// Most resources held per type.
    pub max_resources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            max_resources: 200_000,
        }
    }
}

/// A resource that changed, for the shared-data writer.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Pool {
        name: String,
        state: Option<PoolState>,
    },
    Shard {
        name: String,
        pool: String,
        shard: Option<ResidencyShard>,
    },
}

/// What to do after a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// ACK or NACK to send back (encoded DeltaDiscoveryRequest).
    pub reply: Vec<u8>,
    /// `Some(reason)` when the response was refused.
    pub nacked: Option<String>,
    pub changes: Vec<Change>,
}

/// The response could not be read at all: the stream must be reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    TooLarge(usize),
    Undecodable(String),
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::TooLarge(n) => write!(f, "response of {n} bytes exceeds the limit"),
            ProtocolError::Undecodable(e) => write!(f, "undecodable response: {e}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Client {
    node_id: String,
    limits: Limits,
    /// type URL -> name -> version held.
    versions: BTreeMap<&'static str, BTreeMap<String, String>>,
    pub acks: u64,
    pub nacks: u64,
}

/// The pool a shard resource belongs to: names are `<pool>/<replica>/<shard>`.
fn pool_of(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

impl Client {
    pub fn new(node_id: impl Into<String>, limits: Limits) -> Self {
        Self {
            node_id: node_id.into(),
            limits,
            ..Default::default()
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The first requests of a stream: a wildcard subscription per type,
    /// telling the server which versions are already held.
    pub fn subscribe_requests(&self) -> Vec<Vec<u8>> {
        [POOL_STATE, RESIDENCY_SHARD]
            .into_iter()
            .map(|t| {
                DeltaDiscoveryRequest {
                    node: Some(Node {
                        id: self.node_id.clone(),
                    }),
                    type_url: t.to_owned(),
                    resource_names_subscribe: vec!["*".to_owned()],
                    initial_resource_versions: self
                        .versions
                        .get(t)
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect()
    }

    fn reply(&self, type_url: &str, nonce: &str, error: Option<&str>) -> Vec<u8> {
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error.map(|m| RpcStatus {
                code: INVALID_ARGUMENT,
                message: m.to_owned(),
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Applies one response (all of it, or nothing) and says what to answer.
    pub fn on_message(&mut self, bytes: &[u8]) -> Result<Outcome, ProtocolError> {
        if bytes.len() > self.limits.max_message_bytes {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        let resp = DeltaDiscoveryResponse::decode(bytes)
            .map_err(|e| ProtocolError::Undecodable(e.to_string()))?;
        match self.decode(&resp) {
            Ok(changes) => {
                let key = if resp.type_url == POOL_STATE {
                    POOL_STATE
                } else {
                    RESIDENCY_SHARD
                };
                let held = self.versions.entry(key).or_default();
                for name in &resp.removed_resources {
                    held.remove(name);
                }
                for r in &resp.resources {
                    held.insert(r.name.clone(), r.version.clone());
                }
                self.acks += 1;
                Ok(Outcome {
                    reply: self.reply(&resp.type_url, &resp.nonce, None),
                    nacked: None,
                    changes,
                })
            }
            Err(reason) => {
                self.nacks += 1;
                Ok(Outcome {
                    reply: self.reply(&resp.type_url, &resp.nonce, Some(&reason)),
                    nacked: Some(reason),
                    changes: Vec::new(),
                })
            }
        }
    }

    fn decode(&self, resp: &DeltaDiscoveryResponse) -> Result<Vec<Change>, String> {
        let is_pool = match resp.type_url.as_str() {
            POOL_STATE => true,
            RESIDENCY_SHARD => false,
            other => return Err(format!("unexpected type {other}")),
        };
        let held = self
            .versions
            .get(if is_pool { POOL_STATE } else { RESIDENCY_SHARD });
        let added = resp
            .resources
            .iter()
            .filter(|r| held.is_none_or(|h| !h.contains_key(&r.name)))
            .count();
        if held.map_or(0, BTreeMap::len) + added > self.limits.max_resources {
            return Err(format!(
                "more than {} resources of {}",
                self.limits.max_resources, resp.type_url
            ));
        }
        let mut changes = Vec::with_capacity(resp.resources.len() + resp.removed_resources.len());
        for name in &resp.removed_resources {
            changes.push(if is_pool {
                Change::Pool {
                    name: name.clone(),
                    state: None,
                }
            } else {
                Change::Shard {
                    name: name.clone(),
                    pool: pool_of(name).to_owned(),
                    shard: None,
                }
            });
        }
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                return Err(format!("resource {} has no body", r.name));
            };
            if any.type_url != resp.type_url {
                return Err(format!(
                    "resource {} is a {}, not a {}",
                    r.name, any.type_url, resp.type_url
                ));
            }
            if is_pool {
                let state = PoolState::decode(any.value.as_slice())
                    .map_err(|e| format!("resource {}: {e}", r.name))?;
                if state.pool != r.name {
                    return Err(format!("PoolState {} names pool {:?}", r.name, state.pool));
                }
                changes.push(Change::Pool {
                    name: r.name.clone(),
                    state: Some(state),
                });
            } else {
                let shard = ResidencyShard::decode(any.value.as_slice())
                    .map_err(|e| format!("resource {}: {e}", r.name))?;
                if shard.shard_count == 0 || shard.shard >= shard.shard_count {
                    return Err(format!(
                        "ResidencyShard {}: shard {} of {}",
                        r.name, shard.shard, shard.shard_count
                    ));
                }
                if pool_of(&r.name) != shard.pool {
                    return Err(format!(
                        "ResidencyShard {} names pool {:?}",
                        r.name, shard.pool
                    ));
                }
                changes.push(Change::Shard {
                    name: r.name.clone(),
                    pool: shard.pool.clone(),
                    shard: Some(shard),
                });
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Any, Resource};

    fn pool_resource(name: &str, version: &str) -> Resource {
        let state = PoolState {
            pool: name.into(),
            model: "m".into(),
            chunk_bytes: 256,
            replicas: vec![],
        };
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: POOL_STATE.into(),
                value: state.encode_to_vec(),
            }),
        }
    }

    fn response(resources: Vec<Resource>, removed: &[&str], nonce: &str) -> Vec<u8> {
        DeltaDiscoveryResponse {
            type_url: POOL_STATE.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn decode_req(b: &[u8]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest::decode(b).expect("request")
    }

    #[test]
    fn acks_applies_and_resubscribes_with_versions() {
        let mut c = Client::new("node", Limits::default());
        let first = c.subscribe_requests();
        assert_eq!(first.len(), 2);
        assert_eq!(
            decode_req(&first[0]).resource_names_subscribe,
            vec!["*".to_string()]
        );
        let out = c
            .on_message(&response(vec![pool_resource("p", "v1")], &[], "n1"))
            .expect("ok");
        assert_eq!(out.nacked, None);
        let ack = decode_req(&out.reply);
        assert_eq!(
            (ack.response_nonce.as_str(), ack.error_detail),
            ("n1", None)
        );
        assert!(matches!(&out.changes[..], [Change::Pool { name, state: Some(_) }] if name == "p"));
        let again = decode_req(&c.subscribe_requests()[0]);
        assert_eq!(
            again.initial_resource_versions.get("p").map(String::as_str),
            Some("v1")
        );
        let out = c.on_message(&response(vec![], &["p"], "n2")).expect("ok");
        assert!(matches!(
            &out.changes[..],
            [Change::Pool { state: None, .. }]
        ));
        assert!(
            decode_req(&c.subscribe_requests()[0])
                .initial_resource_versions
                .is_empty()
        );
    }

    #[test]
    fn nacks_bad_resources_and_applies_nothing() {
        let mut c = Client::new("node", Limits::default());
        let mut bad = pool_resource("q", "v1");
        bad.resource = Some(Any {
            type_url: POOL_STATE.into(),
            value: vec![0xff, 0xff, 0xff],
        });
        let out = c
            .on_message(&response(vec![pool_resource("p", "v1"), bad], &[], "n1"))
            .expect("read");
        assert!(out.nacked.is_some());
        assert!(out.changes.is_empty());
        let nack = decode_req(&out.reply);
        assert_eq!(nack.response_nonce, "n1");
        assert!(nack.error_detail.is_some());
        // Nothing held: a resubscribe asks for everything.
        assert!(
            decode_req(&c.subscribe_requests()[0])
                .initial_resource_versions
                .is_empty()
        );
        let mismatched = pool_resource("other-name", "v1");
        let mut renamed = mismatched.clone();
        renamed.name = "p".into();
        let out = c
            .on_message(&response(vec![renamed], &[], "n2"))
            .expect("read");
        assert!(out.nacked.is_some());
    }

    #[test]
    fn bounds_message_size_and_resource_count() {
        let mut c = Client::new(
            "node",
            Limits {
                max_message_bytes: 64,
                max_resources: 1,
            },
        );
        let big = response(vec![pool_resource("p", &"v".repeat(100))], &[], "n");
        assert!(matches!(
            c.on_message(&big),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut c = Client::new(
            "node",
            Limits {
                max_message_bytes: 1 << 20,
                max_resources: 1,
            },
        );
        let two = response(
            vec![pool_resource("p", "1"), pool_resource("q", "1")],
            &[],
            "n",
        );
        assert!(c.on_message(&two).expect("read").nacked.is_some());
        assert!(matches!(
            c.on_message(&[0xff, 0x01]),
            Err(ProtocolError::Undecodable(_))
        ));
    }
}
