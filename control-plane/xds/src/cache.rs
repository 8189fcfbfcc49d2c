//! Snapshots per node: the server's streams watch the snapshot of their node
//! and answer every change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::resource::Snapshot;

type Slot = watch::Sender<Option<Arc<Snapshot>>>;

/// Holds the current snapshot of every node, plus a default for nodes with
/// none of their own. A node with no snapshot (and no default) is served
/// nothing: its requests wait, so Envoy keeps what it has.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    default: Option<Arc<Snapshot>>,
    /// (channel, whether the node has a snapshot of its own)
    nodes: HashMap<String, (Slot, bool)>,
}

impl SnapshotCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the snapshot of every node that has none of its own.
    pub fn set_default(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        let mut inner = self.lock();
        inner.default = Some(Arc::clone(&snapshot));
        for (slot, own) in inner.nodes.values() {
            if !own {
                slot.send_replace(Some(Arc::clone(&snapshot)));
            }
        }
    }

    /// Sets one node's own snapshot.
    pub fn set_node(&self, node: &str, snapshot: Snapshot) {
        let snapshot = Some(Arc::new(snapshot));
        let mut inner = self.lock();
        match inner.nodes.get_mut(node) {
            Some((slot, own)) => {
                *own = true;
                slot.send_replace(snapshot);
            }
            None => {
                inner
                    .nodes
                    .insert(node.to_owned(), (watch::channel(snapshot).0, true));
            }
        }
    }

    pub fn default_snapshot(&self) -> Option<Arc<Snapshot>> {
        self.lock().default.clone()
    }

    /// The snapshot a node is served, and its changes.
    pub fn watch(&self, node: &str) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut inner = self.lock();
        let default = inner.default.clone();
        inner
            .nodes
            .entry(node.to_owned())
            .or_insert_with(|| (watch::channel(default).0, false))
            .0
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Resource, type_url};
    use envoy_types::pb::google::protobuf::Any;

    fn snap(body: &str) -> Snapshot {
        Snapshot::new().with(
            type_url::CLUSTER,
            [Resource::new(
                "c",
                Any {
                    type_url: type_url::CLUSTER.into(),
                    value: body.into(),
                },
            )],
        )
    }

    #[test]
    fn nodes_follow_default_unless_they_have_their_own() {
        let cache = SnapshotCache::new();
        let a = cache.watch("a");
        assert!(
            a.borrow().is_none(),
            "nothing served before a snapshot exists"
        );
        cache.set_default(snap("1"));
        assert_eq!(a.borrow().as_deref(), Some(&snap("1")));
        cache.set_node("b", snap("own"));
        cache.set_default(snap("2"));
        assert_eq!(a.borrow().as_deref(), Some(&snap("2")));
        assert_eq!(cache.watch("b").borrow().as_deref(), Some(&snap("own")));
    }
}
