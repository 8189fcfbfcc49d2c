//! Prefix-aware: keeps requests that share a prompt prefix on the replica that
//! served it before, learned from its own decisions; no state from the servers.
//!
//! - Affinity: chunk hash -> replica, written for every chunk of every routed
//!   request, in an [`AgingMap`] of bounded size (old entries age out).
//! - A request goes to the replica remembered for its deepest known chunk.
//!   With none, the rendezvous hash of its first chunk picks, so every worker
//!   VM (each with its own table) places a new prefix on the same replica.
//! - Bounded load: no replica takes a request while it has
//!   `ceil(load_factor * (in_flight + 1) / replicas)` or more in flight and
//!   also `spill_gap` or more above the least loaded replica. The gap keeps
//!   small counts from spilling (with two replicas and three requests in
//!   flight, two on one replica is already over a relative bound; spilling
//!   costs the request its cached prefix). A hot prefix spills to the next
//!   replica in its rendezvous order, always the same one, which learns the
//!   request's new chunks but does not take over the prefix: the prefix's
//!   home stays where it is cached, and the spill target warms up as its
//!   second holder, so a hot prefix spreads as load grows instead of
//!   pinning one replica or moving back and forth.
//!
//! In-flight counts are this policy instance's own (one Envoy worker VM).

use serde::Deserialize;

use super::{
    AgingMap, Choice, ConfigError, Event, Policy, Reason, Request, SlotCounters, rendezvous,
};
use crate::snapshot::{ReplicaRef, Snapshot};

/// Parameters of [`PrefixAware`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixAwareConfig {
    /// Affinity entries kept (chunk hashes); memory is about 40 bytes each.
    pub capacity: usize,
    /// How far above the mean in-flight count one replica may go (>= 1).
    pub load_factor: f64,
    /// In-flight requests a replica must have above the least loaded one
    /// before it spills (>= 1; 1 leaves the relative bound alone).
    pub spill_gap: u64,
    /// Fallbacks listed after the primary.
    pub max_fallbacks: usize,
}

impl Default for PrefixAwareConfig {
    fn default() -> Self {
        Self {
            capacity: 200_000,
            load_factor: 1.25,
            spill_gap: 4,
            max_fallbacks: 2,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct PrefixAware {
    config: PrefixAwareConfig,
    affinity: AgingMap<ReplicaRef>,
    in_flight: SlotCounters,
}

impl PrefixAware {
    /// Checks the parameters.
    pub fn new(config: PrefixAwareConfig) -> Result<Self, ConfigError> {
        if !(config.load_factor >= 1.0 && config.load_factor.is_finite()) {
            return Err(ConfigError::Invalid {
                strategy: "prefix-aware",
                message: format!("load_factor must be >= 1, got {}", config.load_factor),
            });
        }
        if config.spill_gap < 1 {
            return Err(ConfigError::Invalid {
                strategy: "prefix-aware",
                message: "spill_gap must be >= 1".into(),
            });
        }
        if config.capacity < 2 {
            return Err(ConfigError::Invalid {
                strategy: "prefix-aware",
                message: "capacity must be >= 2".into(),
            });
        }
        Ok(Self {
            affinity: AgingMap::new(config.capacity),
            config,
            in_flight: SlotCounters::default(),
        })
    }

    /// Requests this instance routed to `replica` that have not finished.
    pub fn in_flight(&self, replica: ReplicaRef) -> u64 {
        self.in_flight.get(replica)
    }

    /// The in-flight count at which a replica of `snapshot` takes no more:
    /// `max(ceil(load_factor * (in_flight + 1) / replicas), least + spill_gap)`,
    /// in-flight counted over the live replicas only. The least loaded replica
    /// is always under it.
    pub fn load_bound(&self, snapshot: &Snapshot) -> u64 {
        if snapshot.is_empty() {
            return 0;
        }
        let (total, least) = snapshot
            .replicas()
            .map(|(r, _)| self.in_flight.get(r))
            .fold((0u64, u64::MAX), |(t, m), n| (t + n, m.min(n)));
        let n = snapshot.len() as f64;
        let relative = (self.config.load_factor * (total as f64 + 1.0) / n).ceil() as u64;
        relative.max(least.saturating_add(self.config.spill_gap))
    }

    /// Affinity entries held.
    pub fn affinity_len(&self) -> usize {
        self.affinity.len()
    }

    fn deepest_affinity(&self, snapshot: &Snapshot, chunks: &[u64]) -> Option<(ReplicaRef, u32)> {
        chunks.iter().enumerate().rev().find_map(|(i, &c)| {
            let r = self.affinity.get(c)?;
            snapshot.get(r)?;
            Some((r, i as u32 + 1))
        })
    }
}

impl Default for PrefixAware {
    fn default() -> Self {
        // The default configuration is valid by construction.
        Self {
            affinity: AgingMap::new(PrefixAwareConfig::default().capacity),
            config: PrefixAwareConfig::default(),
            in_flight: SlotCounters::default(),
        }
    }
}

impl Policy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix-aware"
    }

    fn select(&self, snapshot: &Snapshot, request: &Request<'_>) -> Choice {
        if snapshot.is_empty() {
            return Choice::none();
        }
        let bound = self.load_bound(snapshot);
        // No identity: least in flight; the key only orders the fallbacks.
        let key = request.chunks.first().copied().unwrap_or(0);
        // Rendezvous order for this prefix: the spill and fallback order.
        let mut order: Vec<(u64, ReplicaRef)> = snapshot
            .replicas()
            .map(|(r, rep)| (rendezvous(key, rep.key), r))
            .collect();
        order.sort_unstable_by_key(|&(score, _)| std::cmp::Reverse(score));
        let under_bound = |r: ReplicaRef| self.in_flight.get(r) < bound;

        let (preferred, matched, reason) = if request.chunks.is_empty() {
            let least = order
                .iter()
                .map(|&(_, r)| r)
                .min_by_key(|&r| self.in_flight.get(r));
            (least, 0, Reason::NoPrompt)
        } else {
            match self.deepest_affinity(snapshot, request.chunks) {
                Some((r, m)) => (Some(r), m, Reason::Affinity),
                None => (order.first().map(|&(_, r)| r), 0, Reason::Hash),
            }
        };
        let Some(preferred) = preferred else {
            return Choice::none();
        };
        let (primary, matched, reason) = if under_bound(preferred) {
            (preferred, matched, reason)
        } else {
            // Some replica is always under the bound: the bound is at least
            // the mean of the in-flight counts plus one request.
            let spill = order
                .iter()
                .map(|&(_, r)| r)
                .find(|&r| r != preferred && under_bound(r))
                .unwrap_or(preferred);
            let m = if spill == preferred { matched } else { 0 };
            (
                spill,
                m,
                if spill == preferred {
                    reason
                } else {
                    Reason::Spilled
                },
            )
        };
        let fallbacks = std::iter::once(preferred)
            .chain(order.iter().map(|&(_, r)| r))
            .filter(|&r| r != primary)
            .fold(Vec::new(), |mut acc, r| {
                if !acc.contains(&r) && acc.len() < self.config.max_fallbacks {
                    acc.push(r);
                }
                acc
            });
        Choice {
            primary: Some(primary),
            fallbacks,
            matched_chunks: matched,
            reason,
        }
    }

    fn observe(&mut self, snapshot: &Snapshot, event: &Event<'_>) {
        match *event {
            Event::Routed { request, choice } => {
                let Some(r) = choice.primary else { return };
                if snapshot.get(r).is_none() {
                    return;
                }
                self.in_flight.add(r, 1);
                let spilled = choice.reason == Reason::Spilled;
                for &c in request.chunks {
                    // A spill does not move a prefix's home: a chunk that has a
                    // live replica keeps it (written again, so it stays young).
                    let home = if spilled {
                        self.affinity
                            .get(c)
                            .filter(|&h| snapshot.get(h).is_some())
                            .unwrap_or(r)
                    } else {
                        r
                    };
                    self.affinity.insert(c, home);
                }
            }
            Event::Finished { replica } => {
                self.in_flight.add(replica, -1);
            }
        }
    }
}
