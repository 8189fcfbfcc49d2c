//! What Envoy shares between the VMs of one `vm_id`: shared data (with CAS),
//! shared queues and metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::Status;

/// The state shared by every plugin instance created with the same `vm_id`,
/// like Envoy's per-`vm_id` shared data across worker threads.
#[derive(Debug, Default)]
pub struct SharedVm {
    data: Mutex<Data>,
    queues: Mutex<Queues>,
    metrics: Mutex<Metrics>,
}

#[derive(Debug, Default)]
struct Data {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

#[derive(Debug, Default)]
struct Queues {
    by_name: HashMap<String, u32>,
    /// Queue `id` lives at `list[id - 1]`.
    list: Vec<Queue>,
    /// Queue-ready notifications not yet delivered, per plugin instance:
    /// (context id, queue id), one per enqueue, in order.
    ready: HashMap<u64, VecDeque<(u32, u32)>>,
}

#[derive(Debug)]
struct Queue {
    owner: (u64, u32),
    items: VecDeque<Vec<u8>>,
}

/// The kind of a metric, as `proxy_define_metric` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Set or moved either way.
    Gauge,
    /// Every recorded sample is kept.
    Histogram,
}

/// The value of one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    /// A counter's total.
    Counter(u64),
    /// A gauge's current value.
    Gauge(i64),
    /// A histogram's samples, oldest first.
    Histogram(Vec<u64>),
}

#[derive(Debug, Default)]
struct Metrics {
    by_name: HashMap<String, u32>,
    /// Metric `id` lives at `list[id - 1]`.
    list: Vec<(String, MetricValue)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps
    // half-updated (every update is a single insert), so keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl SharedVm ===

impl SharedVm {
    /// Reads a shared-data value and its CAS token.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).entries.get(key).cloned()
    }

    /// Writes a shared-data value. `cas == 0` always succeeds; otherwise the
    /// write succeeds only if the key is absent or still has this CAS token
    /// (Envoy's semantics), else `Err(Status::CasMismatch)`.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let mut data = lock(&self.data);
        if cas != 0
            && let Some((_, current)) = data.entries.get(key)
            && *current != cas
        {
            return Err(Status::CasMismatch);
        }
        data.next_cas = data.next_cas.wrapping_add(1).max(1);
        let next = data.next_cas;
        data.entries.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }

    /// Every shared-data key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = lock(&self.data).entries.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Registers (or re-registers) a queue owned by `owner` = (plugin
    /// instance, root context); returns its id.
    pub(crate) fn register_queue(&self, name: &str, owner: (u64, u32)) -> u32 {
        let mut q = lock(&self.queues);
        if let Some(&id) = q.by_name.get(name) {
            if let Some(queue) = q.list.get_mut(id as usize - 1) {
                queue.owner = owner;
            }
            return id;
        }
        q.list.push(Queue {
            owner,
            items: VecDeque::new(),
        });
        let id = q.list.len() as u32;
        q.by_name.insert(name.to_owned(), id);
        id
    }

    /// The id of a registered queue.
    pub fn resolve_queue(&self, name: &str) -> Option<u32> {
        lock(&self.queues).by_name.get(name).copied()
    }

    /// Appends to a queue and notifies its owner.
    pub fn enqueue(&self, id: u32, value: &[u8]) -> Result<(), Status> {
        let mut q = lock(&self.queues);
        let queue = q
            .list
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        queue.items.push_back(value.to_vec());
        let (instance, context) = queue.owner;
        q.ready
            .entry(instance)
            .or_default()
            .push_back((context, id));
        Ok(())
    }

    /// Takes the oldest item of a queue: `Err(Empty)` when there is none.
    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut q = lock(&self.queues);
        let queue = q
            .list
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }

    /// Takes the next undelivered queue-ready notification for an instance.
    pub(crate) fn next_ready(&self, instance: u64) -> Option<(u32, u32)> {
        lock(&self.queues)
            .ready
            .get_mut(&instance)
            .and_then(VecDeque::pop_front)
    }

    /// Defines a metric (or returns the id of the one with this name).
    pub(crate) fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let mut m = lock(&self.metrics);
        if let Some(&id) = m.by_name.get(name) {
            let same_kind = matches!(
                (kind, &m.list[id as usize - 1].1),
                (MetricKind::Counter, MetricValue::Counter(_))
                    | (MetricKind::Gauge, MetricValue::Gauge(_))
                    | (MetricKind::Histogram, MetricValue::Histogram(_))
            );
            return if same_kind {
                Ok(id)
            } else {
                Err(Status::BadArgument)
            };
        }
        let value = match kind {
            MetricKind::Counter => MetricValue::Counter(0),
            MetricKind::Gauge => MetricValue::Gauge(0),
            MetricKind::Histogram => MetricValue::Histogram(Vec::new()),
        };
        m.list.push((name.to_owned(), value));
        let id = m.list.len() as u32;
        m.by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    fn with_metric<R>(
        &self,
        id: u32,
        f: impl FnOnce(&mut MetricValue) -> Result<R, Status>,
    ) -> Result<R, Status> {
        let mut m = lock(&self.metrics);
        let (_, value) = m
            .list
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        f(value)
    }

    pub(crate) fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status> {
        self.with_metric(id, |v| match v {
            MetricValue::Counter(c) if offset >= 0 => {
                *c = c.saturating_add(offset as u64);
                Ok(())
            }
            MetricValue::Gauge(g) => {
                *g = g.saturating_add(offset);
                Ok(())
            }
            _ => Err(Status::BadArgument),
        })
    }

    pub(crate) fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.with_metric(id, |v| match v {
            MetricValue::Counter(c) => {
                *c = value;
                Ok(())
            }
            MetricValue::Gauge(g) => {
                *g = i64::try_from(value).unwrap_or(i64::MAX);
                Ok(())
            }
            MetricValue::Histogram(h) => {
                h.push(value);
                Ok(())
            }
        })
    }

    pub(crate) fn get_metric(&self, id: u32) -> Result<u64, Status> {
        self.with_metric(id, |v| match v {
            MetricValue::Counter(c) => Ok(*c),
            MetricValue::Gauge(g) => Ok(*g as u64),
            MetricValue::Histogram(_) => Err(Status::BadArgument),
        })
    }

    /// A metric's value by name.
    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        let m = lock(&self.metrics);
        let id = *m.by_name.get(name)?;
        Some(m.list[id as usize - 1].1.clone())
    }

    /// Every metric, sorted by name.
    pub fn metrics(&self) -> Vec<(String, MetricValue)> {
        let mut all = lock(&self.metrics).list.clone();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules_match_envoy() {
        let vm = SharedVm::default();
        vm.set("k", b"a", 0).unwrap();
        let (_, cas) = vm.get("k").unwrap();
        vm.set("k", b"b", cas).unwrap();
        assert_eq!(vm.set("k", b"c", cas), Err(Status::CasMismatch));
        assert_eq!(vm.get("k").unwrap().0, b"b");
        // A non-zero CAS on an absent key inserts.
        vm.set("absent", b"x", 12345).unwrap();
        // CAS 0 always wins.
        vm.set("k", b"d", 0).unwrap();
        assert_eq!(vm.get("k").unwrap().0, b"d");
    }

    #[test]
    fn queue_notifies_owner_once_per_enqueue() {
        let vm = SharedVm::default();
        let id = vm.register_queue("q", (7, 1));
        assert_eq!(vm.resolve_queue("q"), Some(id));
        vm.enqueue(id, b"1").unwrap();
        vm.enqueue(id, b"2").unwrap();
        assert_eq!(vm.next_ready(7), Some((1, id)));
        assert_eq!(vm.next_ready(7), Some((1, id)));
        assert_eq!(vm.next_ready(7), None);
        assert_eq!(vm.dequeue(id).unwrap(), b"1");
        assert_eq!(vm.dequeue(id).unwrap(), b"2");
        assert_eq!(vm.dequeue(id), Err(Status::Empty));
        assert_eq!(vm.enqueue(99, b"x"), Err(Status::NotFound));
    }

    #[test]
    fn counters_refuse_negative_increments() {
        let vm = SharedVm::default();
        let c = vm.define_metric(MetricKind::Counter, "c").unwrap();
        assert_eq!(vm.define_metric(MetricKind::Counter, "c"), Ok(c));
        assert_eq!(
            vm.define_metric(MetricKind::Gauge, "c"),
            Err(Status::BadArgument)
        );
        vm.increment_metric(c, 3).unwrap();
        assert_eq!(vm.increment_metric(c, -1), Err(Status::BadArgument));
        assert_eq!(vm.metric("c"), Some(MetricValue::Counter(3)));
    }
}
