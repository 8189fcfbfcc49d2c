//! Resources and snapshots: what the server serves, keyed by type URL and name,
//! each with a content version.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;

/// Type URLs of the resources this server knows how to serve.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// ECDS: extension configs (the routing filter).
    pub const EXTENSION_CONFIG: &str =
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    /// kvmesh live state, for the state pump (delta only in practice).
    pub const POOL_STATE: &str = "type.googleapis.com/kvmesh.v1.PoolState";
    pub const RESIDENCY_SHARD: &str = "type.googleapis.com/kvmesh.v1.ResidencyShard";

    /// Types whose state-of-the-world subscriptions are wildcard when no name
    /// is listed (xDS: LDS and CDS).
    pub fn wildcard_by_default(type_url: &str) -> bool {
        type_url == LISTENER || type_url == CLUSTER
    }
}

/// A body encoded only when it is sent. Large, changing resources (residency
/// shards) would otherwise be held twice: once as the caller's data and once
/// encoded in the snapshot. The caller hands out an immutable view (e.g.
/// `Arc`-shared lists) and a version it computed from the same content.
pub trait LazyBody: Send + Sync + std::fmt::Debug {
    /// The message encoded (what [`Any::value`] carries).
    fn encode(&self) -> Vec<u8>;
    /// Length of [`encode`](Self::encode)'s output, without encoding.
    fn encoded_len(&self) -> usize;
}

#[derive(Debug, Clone)]
enum Body {
    Encoded(Any),
    Lazy {
        type_url: String,
        body: Arc<dyn LazyBody>,
    },
}

/// One named resource with the version of its content.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    /// Hash of the content: equal content, equal version, across restarts.
    pub version: String,
    body: Body,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.version == other.version && self.body() == other.body()
    }
}

impl Resource {
    pub fn new(name: impl Into<String>, body: Any) -> Self {
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body.value));
        Self {
            name: name.into(),
            version,
            body: Body::Encoded(body),
        }
    }

    /// Encodes `msg` as an `Any` of `type_url`.
    pub fn from_message(
        name: impl Into<String>,
        type_url: &str,
        msg: &impl prost::Message,
    ) -> Self {
        Self::new(
            name,
            Any {
                type_url: type_url.to_owned(),
                value: msg.encode_to_vec(),
            },
        )
    }

    /// A resource encoded when sent; `version` must change whenever the
    /// encoding would.
    pub fn lazy(
        name: impl Into<String>,
        type_url: &str,
        version: String,
        body: Arc<dyn LazyBody>,
    ) -> Self {
        Self {
            name: name.into(),
            version,
            body: Body::Lazy {
                type_url: type_url.to_owned(),
                body,
            },
        }
    }

    /// The body as sent (encoded now for a lazy resource).
    pub fn body(&self) -> Any {
        match &self.body {
            Body::Encoded(any) => any.clone(),
            Body::Lazy { type_url, body } => Any {
                type_url: type_url.clone(),
                value: body.encode(),
            },
        }
    }

    /// Encoded size of the body: type URL plus value.
    pub fn body_len(&self) -> usize {
        match &self.body {
            Body::Encoded(any) => any.type_url.len() + any.value.len(),
            Body::Lazy { type_url, body } => type_url.len() + body.encoded_len(),
        }
    }
}

/// All resources of one type, with a version of the whole set (used by
/// state-of-the-world responses).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    pub version: String,
    pub resources: BTreeMap<String, Arc<Resource>>,
}

impl TypeResources {
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Self {
        Self::from_shared(
            resources
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect(),
        )
    }

    /// Builds from resources already shared (e.g. cached encodings).
    pub fn from_shared(resources: BTreeMap<String, Arc<Resource>>) -> Self {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (name, r) in &resources {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            h.update(&[0]);
        }
        Self {
            version: format!("{:016x}", h.digest()),
            resources,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }
}

/// Everything one node is served: resources by type URL. Types absent from
/// the map are not served at all (requests for them wait).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, Arc<TypeResources>>,
}

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (replaces) the resources of one type.
    pub fn with(mut self, type_url: &str, resources: impl IntoIterator<Item = Resource>) -> Self {
        self.set(type_url, resources);
        self
    }

    pub fn set(&mut self, type_url: &str, resources: impl IntoIterator<Item = Resource>) {
        self.set_type(type_url, Arc::new(TypeResources::new(resources)));
    }

    /// Sets one type from an already built set (cheap to share between nodes).
    /// Keeps the old `Arc` when nothing changed, so diffing can skip the type.
    pub fn set_type(&mut self, type_url: &str, resources: Arc<TypeResources>) {
        match self.types.get(type_url) {
            Some(old) if old.version == resources.version => {}
            _ => {
                self.types.insert(type_url.to_owned(), resources);
            }
        }
    }

    pub fn get(&self, type_url: &str) -> Option<&Arc<TypeResources>> {
        self.types.get(type_url)
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, body: &[u8]) -> Resource {
        Resource::new(
            name,
            Any {
                type_url: "t".into(),
                value: body.to_vec(),
            },
        )
    }

    #[test]
    fn versions_follow_content_only() {
        assert_eq!(res("a", b"x").version, res("b", b"x").version);
        assert_ne!(res("a", b"x").version, res("a", b"y").version);
        let one = TypeResources::new([res("a", b"x"), res("b", b"y")]);
        let same = TypeResources::new([res("b", b"y"), res("a", b"x")]);
        let renamed = TypeResources::new([res("a", b"x"), res("c", b"y")]);
        assert_eq!(one.version, same.version);
        assert_ne!(one.version, renamed.version);
    }

    #[derive(Debug)]
    struct Fixed(Vec<u8>);

    impl LazyBody for Fixed {
        fn encode(&self) -> Vec<u8> {
            self.0.clone()
        }
        fn encoded_len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn lazy_body_encodes_when_asked() {
        let r = Resource::lazy("a", "t", "v1".into(), Arc::new(Fixed(b"xyz".to_vec())));
        assert_eq!(
            r.body(),
            Any {
                type_url: "t".into(),
                value: b"xyz".to_vec()
            }
        );
        assert_eq!(r.body_len(), 4);
        assert_eq!(res("a", b"xyz").body(), r.body());
    }

    #[test]
    fn set_type_keeps_unchanged_arc() {
        let mut s = Snapshot::new().with("t", [res("a", b"x")]);
        let before = Arc::clone(s.get("t").expect("type set"));
        s.set("t", [res("a", b"x")]);
        assert!(Arc::ptr_eq(&before, s.get("t").expect("type set")));
        s.set("t", [res("a", b"z")]);
        assert!(!Arc::ptr_eq(&before, s.get("t").expect("type set")));
    }
}
