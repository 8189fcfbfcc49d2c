//! State-of-the-world protocol state of one type on one stream: what the
//! client subscribed to, what was last sent under which nonce, and how the
//! client answered. Pure: no I/O, driven by requests and snapshots.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::resource::{Resource, TypeResources, type_url};
use crate::status::Answer;

/// What a request said about the previous response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// First request of this type on the stream (or after a reconnect).
    Initial,
    /// The response with this nonce was applied.
    Ack(Sent),
    /// The response with this nonce was rejected; `message` says why.
    Nack(Sent, String),
    /// The nonce is not the latest one sent: the reply is for an older
    /// response and carries no information (xDS: ignore it).
    Stale,
}

/// A response that was sent: its nonce, version and resources (name, version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub nonce: String,
    pub version: String,
    pub resources: Vec<(String, String)>,
}

impl Reply {
    /// The per-resource answer, for the status tracker.
    pub fn answer(&self) -> Option<(&Sent, Answer)> {
        match self {
            Reply::Ack(s) => Some((s, Answer::Acked)),
            Reply::Nack(s, m) => Some((s, Answer::Nacked(m.clone()))),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SotwType {
    type_url: String,
    /// `None`: wildcard (everything of the type).
    names: Option<BTreeSet<String>>,
    /// The latest response sent and not yet answered or answered.
    last: Option<Sent>,
    /// Version of the last response the client acknowledged.
    acked_version: Option<String>,
    /// A new subscription was requested that the last response did not cover.
    dirty: bool,
}

impl SotwType {
    pub fn new(type_url: impl Into<String>) -> Self {
        Self {
            type_url: type_url.into(),
            names: None,
            last: None,
            acked_version: None,
            dirty: true,
        }
    }

    /// The latest response sent.
    pub fn last(&self) -> Option<&Sent> {
        self.last.as_ref()
    }

    pub fn acked_version(&self) -> Option<&str> {
        self.acked_version.as_deref()
    }

    /// Applies one request; returns what it said about earlier responses.
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> Reply {
        let reply = if req.response_nonce.is_empty() {
            Reply::Initial
        } else {
            match &self.last {
                Some(last) if last.nonce == req.response_nonce => match &req.error_detail {
                    Some(err) => Reply::Nack(last.clone(), err.message.clone()),
                    None => {
                        self.acked_version = Some(last.version.clone());
                        Reply::Ack(last.clone())
                    }
                },
                _ => Reply::Stale,
            }
        };
        if reply == Reply::Stale {
            return reply;
        }
        let names: Option<BTreeSet<String>> = if req.resource_names.is_empty()
            && type_url::wildcard_by_default(&self.type_url)
            || req.resource_names.iter().any(|n| n == "*")
        {
            None
        } else {
            Some(req.resource_names.iter().cloned().collect())
        };
        if names != self.names || reply == Reply::Initial {
            self.names = names;
            self.dirty = true;
        }
        reply
    }

    /// The response to send for `current`, if the client does not have it yet.
    pub fn respond(&mut self, current: &TypeResources, nonce: String) -> Option<DiscoveryResponse> {
        let selected: Vec<&Arc<Resource>> = match &self.names {
            None => current.resources.values().collect(),
            Some(names) => names.iter().filter_map(|n| current.get(n)).collect(),
        };
        let version = match &self.names {
            None => current.version.clone(),
            Some(_) => TypeResources::new(selected.iter().map(|r| Resource::clone(r))).version,
        };
        let unchanged = self.last.as_ref().is_some_and(|l| l.version == version);
        if unchanged && !self.dirty {
            return None;
        }
        self.dirty = false;
        self.last = Some(Sent {
            nonce: nonce.clone(),
            version: version.clone(),
            resources: selected
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
        });
        Some(DiscoveryResponse {
            version_info: version,
            resources: selected.iter().map(|r| r.body()).collect(),
            type_url: self.type_url.clone(),
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status;

    const T: &str = type_url::ENDPOINT;

    fn res(name: &str, body: &str) -> Resource {
        Resource::new(
            name,
            Any {
                type_url: T.into(),
                value: body.as_bytes().to_vec(),
            },
        )
    }

    fn req(names: &[&str], nonce: &str, error: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: T.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| Status {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ack_nack_and_stale_nonces() {
        let snap = TypeResources::new([res("a", "1"), res("b", "1")]);
        let mut s = SotwType::new(T);
        assert_eq!(s.on_request(&req(&["a"], "", None)), Reply::Initial);
        let r1 = s.respond(&snap, "n1".into()).expect("first response");
        assert_eq!(r1.resources.len(), 1);
        // Nothing new: no response.
        assert!(s.respond(&snap, "n2".into()).is_none());
        assert!(matches!(
            s.on_request(&req(&["a"], "n1", None)),
            Reply::Ack(_)
        ));
        assert_eq!(s.acked_version(), Some(r1.version_info.as_str()));

        let snap2 = TypeResources::new([res("a", "2"), res("b", "1")]);
        let r2 = s.respond(&snap2, "n3".into()).expect("changed");
        // A reply to the old nonce is stale and changes nothing.
        assert_eq!(s.on_request(&req(&["a"], "n1", None)), Reply::Stale);
        match s.on_request(&req(&["a"], "n3", Some("bad"))) {
            Reply::Nack(sent, msg) => {
                assert_eq!(sent.version, r2.version_info);
                assert_eq!(msg, "bad");
            }
            other => panic!("expected NACK, got {other:?}"),
        }
        // The NACKed version is not resent, and the acked one stays.
        assert!(s.respond(&snap2, "n4".into()).is_none());
        assert_eq!(s.acked_version(), Some(r1.version_info.as_str()));
    }

    #[test]
    fn only_changes_to_subscribed_names_cause_a_response() {
        let mut s = SotwType::new(T);
        s.on_request(&req(&["a"], "", None));
        s.respond(
            &TypeResources::new([res("a", "1"), res("b", "1")]),
            "n1".into(),
        )
        .expect("first");
        s.on_request(&req(&["a"], "n1", None));
        assert!(
            s.respond(
                &TypeResources::new([res("a", "1"), res("b", "2")]),
                "n2".into()
            )
            .is_none()
        );
        // Subscribing to more names answers at once.
        s.on_request(&req(&["a", "b"], "n1", None));
        let r = s.respond(
            &TypeResources::new([res("a", "1"), res("b", "2")]),
            "n3".into(),
        );
        assert_eq!(r.expect("resubscribe").resources.len(), 2);
    }

    #[test]
    fn wildcard_types_get_everything() {
        let mut s = SotwType::new(type_url::CLUSTER);
        s.on_request(&DiscoveryRequest {
            type_url: type_url::CLUSTER.into(),
            ..Default::default()
        });
        let r = s.respond(
            &TypeResources::new([res("a", "1"), res("b", "1")]),
            "n1".into(),
        );
        assert_eq!(r.expect("wildcard").resources.len(), 2);
    }
}
