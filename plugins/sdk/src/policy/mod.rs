//! Routing strategies: pick the replica for one request; they do not send it.
//!
//! A strategy implements [`Policy`]. `select` is a pure function of the
//! strategy's own state, the pool [`Snapshot`] and the [`Request`]; it returns
//! a [`Choice`]: a primary replica and ordered fallbacks (Envoy tries them in
//! order on a connect failure or a 5xx). `observe` is where a strategy learns:
//! the adapter calls it after a request was routed and when it finished.
//!
//! ```
//! use kvmesh_plugins_sdk::policy::{Choice, Event, Policy, Reason, Request, rank_by};
//! use kvmesh_plugins_sdk::snapshot::Snapshot;
//!
//! /// Sends everything to the replica with the fewest waiting requests.
//! #[derive(Debug, Default)]
//! struct LeastWaiting;
//!
//! impl Policy for LeastWaiting {
//!     fn name(&self) -> &'static str {
//!         "least-waiting"
//!     }
//!     fn select(&self, snapshot: &Snapshot, _request: &Request<'_>) -> Choice {
//!         rank_by(snapshot, 2, Reason::Load, 0, |_, r| -f64::from(r.load.waiting))
//!     }
//!     fn observe(&mut self, _snapshot: &Snapshot, _event: &Event<'_>) {}
//! }
//! ```
//!
//! Strategies must never panic: a panic traps the Envoy VM for every later
//! request. Unknown or removed replicas must never be chosen: resolve every
//! remembered [`ReplicaRef`] through [`Snapshot::get`].

mod aging;
mod kv_aware;
mod prefix_aware;
mod round_robin;

pub use aging::AgingMap;
pub use kv_aware::{KvAware, KvAwareConfig};
pub use prefix_aware::{Placement, PrefixAware, PrefixAwareConfig};
pub use round_robin::RoundRobin;

use crate::snapshot::{Replica, ReplicaRef, Snapshot};

/// What a policy knows of one request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The chunk hash chain of the request's (first) prompt; empty when the
    /// body had no parseable prompt.
    pub chunks: &'a [u64],
    /// Length of the canonical prompt in bytes (0 when unparsed).
    pub prompt_bytes: usize,
}

/// Why a replica was picked; goes into the decision header and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The pool has no replicas; Envoy's own load balancer decides.
    NoReplicas,
    /// The request had no prompt identity; picked by load or rotation.
    NoPrompt,
    /// Round-robin rotation.
    Rotation,
    /// A replica that served this prefix before (learned affinity).
    Affinity,
    /// A prefix no replica holds, placed by the rendezvous hash of its first
    /// chunk ([`Placement::Rendezvous`]).
    Hash,
    /// A prefix no replica holds, placed on the emptiest replica
    /// ([`Placement::Least`]) or the emptier of two ([`Placement::TwoChoices`]).
    Placed,
    /// The learned or hashed replica was over a load bound, or (a request
    /// mostly its own) had recently been sent more own prefill.
    Spilled,
    /// Best score of resident prefix against queued prefill.
    Resident,
    /// Best by load alone.
    Load,
}

impl Reason {
    /// A new prefix was placed: what [`Policy::shares`] shares by default
    /// with the other worker VMs of an Envoy ([`crate::board`]).
    pub fn is_placement(self) -> bool {
        matches!(self, Reason::Hash | Reason::Placed)
    }

    /// Stable label for headers and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoReplicas => "no-replicas",
            Reason::NoPrompt => "no-prompt",
            Reason::Rotation => "rotation",
            Reason::Affinity => "affinity",
            Reason::Hash => "hash",
            Reason::Placed => "placed",
            Reason::Spilled => "spilled",
            Reason::Resident => "resident",
            Reason::Load => "load",
        }
    }
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Where to send the request; `None` only when the pool is empty.
    pub primary: Option<ReplicaRef>,
    /// Where to retry, in order; never contains the primary.
    pub fallbacks: Vec<ReplicaRef>,
    /// Leading chunks of the request the primary is believed to hold.
    pub matched_chunks: u32,
    /// Why.
    pub reason: Reason,
    /// Figures the strategy weighed, named, for the decision header only
    /// (`name=value` each): what a reader needs to tell why a request left
    /// its home, e.g. the home's queued prefill against the bound. Empty
    /// where there is nothing to explain.
    pub figures: Vec<(&'static str, u64)>,
}

impl Choice {
    /// No replica to choose from.
    pub fn none() -> Self {
        Choice {
            primary: None,
            fallbacks: Vec::new(),
            matched_chunks: 0,
            reason: Reason::NoReplicas,
            figures: Vec::new(),
        }
    }

    /// Chunks of `request` past the prefix the primary is believed to hold:
    /// what it computes.
    pub fn own_chunks(&self, request: &Request<'_>) -> u32 {
        let total = u32::try_from(request.chunks.len()).unwrap_or(u32::MAX);
        total - self.matched_chunks.min(total)
    }

    /// Primary then fallbacks.
    pub fn endpoints(&self) -> impl Iterator<Item = ReplicaRef> + '_ {
        self.primary
            .into_iter()
            .chain(self.fallbacks.iter().copied())
    }
}

/// Something a policy may learn from.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// `request` was sent according to `choice`.
    Routed {
        /// The request.
        request: &'a Request<'a>,
        /// What `select` returned.
        choice: &'a Choice,
    },
    /// A request routed to `replica` finished (response done or aborted).
    Finished {
        /// Where it had been sent.
        replica: ReplicaRef,
    },
    /// Another worker VM of this Envoy sent a request to `replica` and
    /// shared the decision ([`Policy::shares`]; read from the placement
    /// board, [`crate::board`]).
    Shared {
        /// The first chunk hashes of the request.
        chunks: &'a [u64],
        /// How many chunks the request had in all.
        total_chunks: u32,
        /// Chunks past the prefix `replica` had cached: what it computes.
        own_chunks: u32,
        /// The request placed a new prefix ([`Reason::is_placement`]).
        placed: bool,
        /// Where it went.
        replica: ReplicaRef,
    },
}

/// A routing strategy. See the module docs for an example.
pub trait Policy {
    /// Short name, e.g. `"prefix-aware"`.
    fn name(&self) -> &'static str;
    /// Picks a replica; must not change anything.
    fn select(&self, snapshot: &Snapshot, request: &Request<'_>) -> Choice;
    /// Learns from what happened.
    fn observe(&mut self, snapshot: &Snapshot, event: &Event<'_>);
    /// Whether the filter should share this policy's decisions that
    /// [`Policy::shares`] picks with the other worker VMs of its Envoy and
    /// feed it theirs as [`Event::Shared`] ([`crate::board`]).
    fn shares_placements(&self) -> bool {
        false
    }
    /// Which decisions to share when [`Policy::shares_placements`]: by
    /// default the placements of new prefixes ([`Reason::is_placement`]).
    fn shares(&self, request: &Request<'_>, choice: &Choice) -> bool {
        let _ = request;
        choice.reason.is_placement()
    }
}

/// A strategy's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unknown strategy name.
    #[error("unknown strategy {0:?} (known: round-robin, prefix-aware, kv-aware)")]
    UnknownStrategy(String),
    /// Parameters did not parse or are out of range.
    #[error("invalid {strategy} parameters: {message}")]
    Invalid {
        /// Strategy name.
        strategy: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Builds a built-in strategy from its name and JSON parameters (`null` or
/// `{}` for the defaults).
pub fn by_name(
    name: &str,
    params: &serde_json::Value,
) -> Result<Box<dyn Policy + Send>, ConfigError> {
    match name {
        "round-robin" => Ok(Box::new(RoundRobin::default())),
        "prefix-aware" => Ok(Box::new(PrefixAware::new(parse_params(
            "prefix-aware",
            params,
        )?)?)),
        "kv-aware" => Ok(Box::new(KvAware::new(parse_params("kv-aware", params)?)?)),
        other => Err(ConfigError::UnknownStrategy(other.to_owned())),
    }
}

/// Parses strategy parameters, treating `null` as the defaults.
pub fn parse_params<T: serde::de::DeserializeOwned + Default>(
    strategy: &'static str,
    params: &serde_json::Value,
) -> Result<T, ConfigError> {
    if params.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(params.clone()).map_err(|e| ConfigError::Invalid {
        strategy,
        message: e.to_string(),
    })
}

/// Ranks every replica by `score` (highest first; ties broken by the
/// rendezvous hash of `tie_key`, so equal replicas share the work) into a
/// choice with up to `max_fallbacks` fallbacks.
pub fn rank_by(
    snapshot: &Snapshot,
    max_fallbacks: usize,
    reason: Reason,
    tie_key: u64,
    mut score: impl FnMut(ReplicaRef, &Replica) -> f64,
) -> Choice {
    let mut ranked: Vec<(f64, u64, ReplicaRef)> = snapshot
        .replicas()
        .map(|(r, rep)| (score(r, rep), rendezvous(tie_key, rep.key), r))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut it = ranked.into_iter().map(|(_, _, r)| r);
    let Some(primary) = it.next() else {
        return Choice::none();
    };
    Choice {
        primary: Some(primary),
        fallbacks: it.take(max_fallbacks).collect(),
        matched_chunks: 0,
        reason,
        figures: Vec::new(),
    }
}

/// The rendezvous (highest random weight) score of `replica_key` for `key`:
/// every worker VM ranks replicas the same way for the same key.
pub fn rendezvous(key: u64, replica_key: u64) -> u64 {
    // splitmix64 finaliser over the pair.
    let mut z = key ^ replica_key.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-slot counters that follow replicas in and out of a snapshot.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotCounters {
    values: Vec<(ReplicaRef, u64)>,
}

impl SlotCounters {
    pub(crate) fn get(&self, r: ReplicaRef) -> u64 {
        match self.values.get(r.slot()) {
            Some((owner, v)) if *owner == r => *v,
            _ => 0,
        }
    }

    pub(crate) fn add(&mut self, r: ReplicaRef, delta: i64) {
        let slot = r.slot();
        if self.values.len() <= slot {
            self.values.resize(slot + 1, (r, 0));
        }
        let entry = &mut self.values[slot];
        if entry.0 != r {
            if delta < 0 {
                // A replica that is gone: its successor's count stays.
                return;
            }
            *entry = (r, 0);
        }
        entry.1 = entry.1.saturating_add_signed(delta);
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
