//! Incremental (delta) xDS protocol state of one type on one stream: the
//! client's subscriptions, the resource versions it holds, and the responses
//! it has not answered yet. Pure: no I/O, driven by requests and snapshots.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource,
};

use crate::resource::{TypeResources, type_url};
use crate::sotw::{Reply, Sent};

/// Responses kept awaiting an answer; older ones are forgotten (their answer
/// then reads as stale).
const MAX_PENDING: usize = 64;

#[derive(Debug, Clone)]
pub struct DeltaType {
    type_url: String,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds (or was sent): name -> version.
    known: BTreeMap<String, String>,
    /// Sent, not yet answered: nonce -> what was sent.
    pending: BTreeMap<String, Sent>,
    pending_order: std::collections::VecDeque<String>,
    /// New names subscribed that have not been answered yet.
    dirty: bool,
    started: bool,
}

impl DeltaType {
    pub fn new(type_url: impl Into<String>) -> Self {
        Self {
            type_url: type_url.into(),
            wildcard: false,
            names: BTreeSet::new(),
            known: BTreeMap::new(),
            pending: BTreeMap::new(),
            pending_order: Default::default(),
            dirty: false,
            started: false,
        }
    }

    /// The versions the client holds, as far as the server knows.
    pub fn known(&self) -> &BTreeMap<String, String> {
        &self.known
    }

    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> Reply {
        let reply = if req.response_nonce.is_empty() {
            Reply::Initial
        } else {
            match self.pending.remove(&req.response_nonce) {
                Some(sent) => {
                    self.pending_order.retain(|n| n != &req.response_nonce);
                    match &req.error_detail {
                        Some(err) => Reply::Nack(sent, err.message.clone()),
                        None => Reply::Ack(sent),
                    }
                }
                None => Reply::Stale,
            }
        };
        if !self.started {
            self.started = true;
            // Legacy wildcard: the first request of a wildcard-by-default type
            // with no names.
            if req.resource_names_subscribe.is_empty()
                && type_url::wildcard_by_default(&self.type_url)
            {
                self.wildcard = true;
            }
            // Reconnect: the client tells what it already has.
            for (name, version) in &req.initial_resource_versions {
                self.known.insert(name.clone(), version.clone());
            }
            self.dirty = true;
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
            self.dirty = true;
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
            if !self.wildcard {
                self.known.remove(name);
            }
        }
        reply
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The response bringing the client from what it holds to `current`, if
    /// anything differs. Versions are recorded as sent (a NACK does not make
    /// the server resend the same content).
    pub fn respond(
        &mut self,
        current: &TypeResources,
        nonce: String,
    ) -> Option<DeltaDiscoveryResponse> {
        self.respond_bounded(current, nonce, usize::MAX)
    }

    /// Like [`respond`](Self::respond), but stops adding resources once the
    /// response holds about `max_bytes` (always at least one resource); the
    /// rest stays due, so calling again until `None` sends everything in
    /// responses of bounded size.
    pub fn respond_bounded(
        &mut self,
        current: &TypeResources,
        nonce: String,
        max_bytes: usize,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut sent = Vec::new();
        let mut bytes = 0usize;
        let candidates: Box<dyn Iterator<Item = _>> = if self.wildcard {
            Box::new(current.resources.values())
        } else {
            Box::new(self.names.iter().filter_map(|n| current.get(n)))
        };
        for r in candidates {
            if self.known.get(&r.name) != Some(&r.version) {
                let size = r.body_len() + r.name.len() + r.version.len() + 16;
                if !resources.is_empty() && bytes.saturating_add(size) > max_bytes {
                    break;
                }
                bytes += size;
                self.known.insert(r.name.clone(), r.version.clone());
                sent.push((r.name.clone(), r.version.clone()));
                resources.push(WireResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|n| self.wants(n) && current.get(n).is_none())
            .cloned()
            .collect();
        for n in &removed {
            self.known.remove(n);
        }
        self.dirty = false;
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        self.pending.insert(
            nonce.clone(),
            Sent {
                nonce: nonce.clone(),
                version: current.version.clone(),
                resources: sent,
            },
        );
        self.pending_order.push_back(nonce.clone());
        while self.pending_order.len() > MAX_PENDING {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending.remove(&old);
            }
        }
        Some(DeltaDiscoveryResponse {
            system_version_info: current.version.clone(),
            resources,
            type_url: self.type_url.clone(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }

    /// True when a request subscribed to something not answered yet.
    pub fn dirty(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Resource;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status;
    use proptest::prelude::*;

    const T: &str = type_url::POOL_STATE;

    fn res(name: &str, body: &str) -> Resource {
        Resource::new(
            name,
            Any {
                type_url: T.into(),
                value: body.as_bytes().to_vec(),
            },
        )
    }

    fn wildcard() -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        }
    }

    fn answer(nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| Status {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    /// A client that applies delta responses the way Envoy does.
    #[derive(Default)]
    struct Client(BTreeMap<String, String>);

    impl Client {
        fn apply(&mut self, r: &DeltaDiscoveryResponse) {
            for n in &r.removed_resources {
                self.0.remove(n);
            }
            for res in &r.resources {
                self.0.insert(res.name.clone(), res.version.clone());
            }
        }
    }

    fn expected(t: &TypeResources) -> BTreeMap<String, String> {
        t.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }

    #[test]
    fn sends_only_what_changed_and_removals() {
        let mut d = DeltaType::new(T);
        d.on_request(&wildcard());
        let r = d.respond(
            &TypeResources::new([res("a", "1"), res("b", "1")]),
            "1".into(),
        );
        assert_eq!(r.expect("initial").resources.len(), 2);
        let r = d.respond(
            &TypeResources::new([res("a", "2"), res("b", "1")]),
            "2".into(),
        );
        let r = r.expect("a changed");
        assert_eq!(r.resources.len(), 1);
        assert_eq!(r.resources[0].name, "a");
        let r = d
            .respond(&TypeResources::new([res("a", "2")]), "3".into())
            .expect("b removed");
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, vec!["b".to_string()]);
        assert!(
            d.respond(&TypeResources::new([res("a", "2")]), "4".into())
                .is_none()
        );
    }

    #[test]
    fn reconnect_with_initial_versions_sends_only_differences() {
        let mut d = DeltaType::new(T);
        let current = TypeResources::new([res("a", "1"), res("b", "1")]);
        let mut req = wildcard();
        req.initial_resource_versions = [
            (
                "a".to_string(),
                current.get("a").expect("a").version.clone(),
            ),
            ("gone".into(), "x".into()),
        ]
        .into_iter()
        .collect();
        d.on_request(&req);
        let r = d.respond(&current, "1".into()).expect("differences");
        assert_eq!(
            r.resources
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!(r.removed_resources, vec!["gone".to_string()]);
    }

    #[test]
    fn ack_nack_match_their_nonce() {
        let mut d = DeltaType::new(T);
        d.on_request(&wildcard());
        d.respond(&TypeResources::new([res("a", "1")]), "1".into())
            .expect("first");
        d.respond(&TypeResources::new([res("a", "2")]), "2".into())
            .expect("second");
        assert!(
            matches!(d.on_request(&answer("2", Some("bad"))), Reply::Nack(s, m) if s.nonce == "2" && m == "bad")
        );
        assert!(matches!(d.on_request(&answer("1", None)), Reply::Ack(s) if s.nonce == "1"));
        assert_eq!(d.on_request(&answer("1", None)), Reply::Stale);
        assert_eq!(d.on_request(&answer("zzz", None)), Reply::Stale);
    }

    #[test]
    fn named_subscriptions_and_unsubscribe() {
        let mut d = DeltaType::new(T);
        d.on_request(&DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: vec!["a".into()],
            ..Default::default()
        });
        let all = TypeResources::new([res("a", "1"), res("b", "1")]);
        let r = d.respond(&all, "1".into()).expect("a");
        assert_eq!(r.resources.len(), 1);
        d.on_request(&DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_unsubscribe: vec!["a".into()],
            resource_names_subscribe: vec!["b".into()],
            ..Default::default()
        });
        let r = d.respond(&all, "2".into()).expect("b");
        assert_eq!(r.resources[0].name, "b");
        assert!(r.removed_resources.is_empty());
    }

    proptest! {
        /// Bounded responses: each stays within the limit (or holds one
        /// resource), and draining them leaves the client with the snapshot.
        #[test]
        fn bounded_responses_drain_to_the_snapshot(
            sizes in proptest::collection::btree_map("[a-z]{1,6}", 1usize..200, 1..40),
            max in 50usize..400,
        ) {
            let mut d = DeltaType::new(T);
            d.on_request(&wildcard());
            let current = TypeResources::new(sizes.iter().map(|(n, len)| res(n, &"x".repeat(*len))));
            let mut client = Client::default();
            let mut n = 0;
            while let Some(r) = d.respond_bounded(&current, n.to_string(), max) {
                let size: usize = r.resources.iter()
                    .map(|x| x.resource.as_ref().map_or(0, |a| a.value.len() + a.type_url.len()) + x.name.len() + x.version.len() + 16)
                    .sum();
                prop_assert!(size <= max || r.resources.len() == 1, "response of {} bytes over {}", size, max);
                client.apply(&r);
                n += 1;
                prop_assert!(n <= sizes.len() + 1);
            }
            prop_assert_eq!(&client.0, &expected(&current));
        }

        /// Whatever sequence of snapshots is served, a client applying every
        /// response ends up holding exactly the last snapshot.
        #[test]
        fn client_converges_to_last_snapshot(
            steps in proptest::collection::vec(
                proptest::collection::btree_map("[a-f]", 0u8..4, 0..6), 1..12)
        ) {
            let mut d = DeltaType::new(T);
            d.on_request(&wildcard());
            let mut client = Client::default();
            let mut last = TypeResources::default();
            for (i, step) in steps.iter().enumerate() {
                last = TypeResources::new(step.iter().map(|(n, v)| res(n, &v.to_string())));
                if let Some(r) = d.respond(&last, i.to_string()) {
                    client.apply(&r);
                    d.on_request(&answer(&r.nonce, None));
                }
                prop_assert_eq!(&client.0, &expected(&last));
                prop_assert_eq!(d.known(), &expected(&last));
            }
            // A reconnect with what the client holds needs no response.
            let mut again = DeltaType::new(T);
            let mut req = wildcard();
            req.initial_resource_versions = client.0.clone().into_iter().collect();
            again.on_request(&req);
            prop_assert!(again.respond(&last, "x".into()).is_none());
        }
    }
}
