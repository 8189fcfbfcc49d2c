//! ACK/NACK bookkeeping per node and per resource, and waiting for a node's
//! answer to a given resource version (what an admin push reports back).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

/// How a client answered a response carrying a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Acked,
    Nacked(String),
}

/// The latest known state of one resource at one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    /// Version most recently sent.
    pub sent_version: String,
    /// Answer to `sent_version`, once there is one.
    pub answer: Option<Answer>,
    /// Last version the node acknowledged (it serves this one).
    pub acked_version: Option<String>,
}

/// Key: (node id, type URL, resource name).
type Key = (String, String, String);

/// Shared tracker; the xDS streams write, the admin side reads and waits.
#[derive(Debug)]
pub struct StatusTracker {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    resources: HashMap<Key, ResourceStatus>,
    /// Connected streams per node (a node may reconnect before the old stream ends).
    connected: BTreeMap<String, usize>,
}

/// What nodes answered for one resource version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub acked: Vec<String>,
    /// (node, message)
    pub nacked: Vec<(String, String)>,
    /// Connected nodes that had not answered by the deadline.
    pub pending: Vec<String>,
}

impl Default for StatusTracker {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl StatusTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain bookkeeping; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn connected(&self, node: &str) {
        *self.lock().connected.entry(node.to_owned()).or_default() += 1;
        self.bump();
    }

    pub fn disconnected(&self, node: &str) {
        let mut inner = self.lock();
        if let Some(n) = inner.connected.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                inner.connected.remove(node);
            }
        }
        drop(inner);
        self.bump();
    }

    pub fn connected_nodes(&self) -> Vec<String> {
        self.lock().connected.keys().cloned().collect()
    }

    pub fn sent(&self, node: &str, type_url: &str, resources: &[(String, String)]) {
        let mut inner = self.lock();
        for (name, version) in resources {
            let e = inner
                .resources
                .entry((node.to_owned(), type_url.to_owned(), name.clone()))
                .or_insert_with(|| ResourceStatus {
                    sent_version: String::new(),
                    answer: None,
                    acked_version: None,
                });
            e.sent_version = version.clone();
            e.answer = None;
        }
    }

    pub fn answered(
        &self,
        node: &str,
        type_url: &str,
        resources: &[(String, String)],
        answer: &Answer,
    ) {
        let mut inner = self.lock();
        for (name, version) in resources {
            let key = (node.to_owned(), type_url.to_owned(), name.clone());
            if let Some(e) = inner.resources.get_mut(&key) {
                if &e.sent_version == version {
                    e.answer = Some(answer.clone());
                }
                if *answer == Answer::Acked {
                    e.acked_version = Some(version.clone());
                }
            }
        }
        drop(inner);
        self.bump();
    }

    pub fn get(&self, node: &str, type_url: &str, name: &str) -> Option<ResourceStatus> {
        self.lock()
            .resources
            .get(&(node.to_owned(), type_url.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Statuses of one resource at every node that was sent it.
    pub fn by_resource(&self, type_url: &str, name: &str) -> Vec<(String, ResourceStatus)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .resources
            .iter()
            .filter(|((_, t, n), _)| t == type_url && n == name)
            .map(|((node, _, _), s)| (node.clone(), s.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn outcome(&self, type_url: &str, name: &str, version: &str) -> (Outcome, bool) {
        let inner = self.lock();
        let mut out = Outcome::default();
        for node in inner.connected.keys() {
            let status = inner
                .resources
                .get(&(node.clone(), type_url.to_owned(), name.to_owned()));
            match status {
                Some(s) if s.sent_version == version => match &s.answer {
                    Some(Answer::Acked) => out.acked.push(node.clone()),
                    Some(Answer::Nacked(m)) => out.nacked.push((node.clone(), m.clone())),
                    None => out.pending.push(node.clone()),
                },
                // Already serving that version from an earlier push.
                Some(s) if s.acked_version.as_deref() == Some(version) => {
                    out.acked.push(node.clone())
                }
                _ => out.pending.push(node.clone()),
            }
        }
        let done = out.pending.is_empty() && !(out.acked.is_empty() && out.nacked.is_empty());
        (out, done)
    }

    /// Waits until every connected node answered `version` of the resource
    /// (at least one node must), or `timeout` passes; returns who said what.
    pub async fn wait_answers(
        &self,
        type_url: &str,
        name: &str,
        version: &str,
        timeout: Duration,
    ) -> Outcome {
        let deadline = Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let (out, done) = self.outcome(type_url, name, version);
            if done {
                return out;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return self.outcome(type_url, name, version).0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rv(n: &str, v: &str) -> Vec<(String, String)> {
        vec![(n.to_owned(), v.to_owned())]
    }

    #[tokio::test]
    async fn waits_for_every_connected_node() {
        let t = std::sync::Arc::new(StatusTracker::default());
        t.connected("n1");
        t.connected("n2");
        t.sent("n1", "T", &rv("f", "v1"));
        t.sent("n2", "T", &rv("f", "v1"));
        t.answered("n1", "T", &rv("f", "v1"), &Answer::Acked);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            t2.wait_answers("T", "f", "v1", Duration::from_secs(10))
                .await
        });
        t.answered(
            "n2",
            "T",
            &rv("f", "v1"),
            &Answer::Nacked("bad wasm".into()),
        );
        let out = waiter.await.expect("join");
        assert_eq!(out.acked, vec!["n1".to_string()]);
        assert_eq!(out.nacked, vec![("n2".to_string(), "bad wasm".to_string())]);
        assert!(out.pending.is_empty());
        // The NACK did not change what n2 serves.
        assert_eq!(t.get("n2", "T", "f").expect("status").acked_version, None);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_pending_nodes() {
        let t = StatusTracker::default();
        t.connected("n1");
        t.sent("n1", "T", &rv("f", "v1"));
        let out = t
            .wait_answers("T", "f", "v1", Duration::from_millis(50))
            .await;
        assert_eq!(out.pending, vec!["n1".to_string()]);
    }
}
