//! Round-robin: the cache-agnostic baseline.

use super::{Choice, Event, Policy, Reason, Request};
use crate::snapshot::Snapshot;

/// Rotates over the replicas in slot order; fallbacks are the next ones.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    next: u64,
    max_fallbacks: usize,
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self {
            next: 0,
            max_fallbacks: 2,
        }
    }
}

impl RoundRobin {
    /// Sets how many fallbacks each choice lists.
    pub fn with_max_fallbacks(mut self, n: usize) -> Self {
        self.max_fallbacks = n;
        self
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn select(&self, snapshot: &Snapshot, _request: &Request<'_>) -> Choice {
        let n = snapshot.len();
        if n == 0 {
            return Choice::none();
        }
        let start = (self.next % n as u64) as usize;
        let live: Vec<_> = snapshot.replicas().map(|(r, _)| r).collect();
        let mut order = live.iter().copied().cycle().skip(start).take(n);
        let primary = order.next();
        Choice {
            primary,
            fallbacks: order.take(self.max_fallbacks).collect(),
            matched_chunks: 0,
            reason: Reason::Rotation,
            figures: Vec::new(),
        }
    }

    fn observe(&mut self, _snapshot: &Snapshot, event: &Event<'_>) {
        if let Event::Routed { .. } = event {
            self.next = self.next.wrapping_add(1);
        }
    }
}
