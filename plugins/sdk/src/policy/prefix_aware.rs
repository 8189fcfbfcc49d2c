//! Prefix-aware: keeps requests that share a prompt prefix on the replica that
//! served it before, learned from its own decisions, from the other worker
//! VMs' placements and from the replicas' reported residency. Of the servers'
//! load it reads only their queued prefill, and only for requests that are
//! mostly their own (below).
//!
//! - Affinity: chunk hash -> replica, written for every chunk of every routed
//!   request, in an [`AgingMap`] of bounded size (old entries age out).
//! - A request goes to the replica remembered for its deepest known chunk.
//! - With none, to the live replica that reports holding the deepest part of
//!   its prefix (any tier): how a worker VM finds where the caches are after
//!   a swap or a restart of Envoy, or where another Envoy placed a prefix.
//! - Held nowhere: a new prefix, placed by [`Placement`]. By default
//!   ([`Placement::Least`]) on the replica holding the fewest prefixes: of
//!   the prefixes recently requested (first chunks, at most 1,024 of them;
//!   every one of the last 512 routed or shared requests), those it reports
//!   in any tier, plus those placed on it that it does not report yet (a
//!   prefill takes seconds before its first blocks seal and show); ties go
//!   to the fewest chunks (counted the same way), then the rendezvous order.
//!   Prefixes, not chunks: each one brings its requests, and a tenant whose
//!   first request carried a long document of its own is still one tenant
//!   (counted by chunks it weighed as three or four and its replica got too
//!   few). The worker VMs of one Envoy share their placements through the
//!   placement board ([`Event::Shared`], [`crate::board`]), so they count the
//!   same placements and agree: sixteen equal prefixes on four replicas go
//!   four to each. [`Placement::TwoChoices`] takes the emptier of the first
//!   two replicas of the prefix's rendezvous order: Envoys that share no
//!   board (sidecars) then disagree between two replicas at most.
//!   [`Placement::Rendezvous`] takes the first replica of that order.
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
//!   pinning one replica or moving back and forth. A request mostly cached
//!   stays at a home that reports `spill_tokens` or more queued prefill, up
//!   to `spill_gap` over the bound: the model server runs the shortest
//!   prefill work first, so its few own tokens are computed there soon,
//!   while the whole prompt it would compute elsewhere waits behind the
//!   prefill there (overloaded bench runs: 24 to 72 s for such a move, 3 to
//!   6 s kept home). A home reporting less is decoding, not prefilling, and
//!   the bound alone decides.
//! - Bounded prefill, for requests with a known home whose own part (chunks
//!   past the matched prefix) outweighs their cached part (a new prefix is
//!   placed as above): no replica takes one while it reports more than
//!   `load_factor` times the mean queued prefill tokens plus
//!   `spill_tokens`. Such a request (a pasted document after a shared
//!   system prompt) moves more prefill than its move costs in recompute, so
//!   it is the one that evens out the replicas when a few tenants' heavy
//!   requests pile onto one home; a request that is mostly cached stays
//!   home whatever that home has queued. It spills, home kept, to the
//!   replica reporting the least queued prefill under both bounds (among
//!   equal queues, as when several are idle, the one with the least own
//!   prefill recently sent, below; then the rendezvous order): the request
//!   is mostly its own, so no second holder is worth warming, and the
//!   emptiest queue is what evens the replicas out.
//! - Balanced own prefill, for the same requests: the policy remembers the
//!   own chunks (past the matched prefix) it sent to each replica over about
//!   the last `balance_window` routed requests (decaying by
//!   `1 - 1 / balance_window` per request). A request mostly its own leaves a
//!   home under both bounds for the replica with the least of it (under both
//!   bounds too, and reporting no more than the mean queued prefill: a move
//!   onto a prefill under way would queue behind it) when the home's figure
//!   is above that replica's by more than twice the chunks the move
//!   recomputes; home kept, as for a spill. The queued-prefill bound sees
//!   only prefills that overlap; this one sees a home that keeps getting its
//!   tenants' long requests one after another (which tenants send them is
//!   chance: in the bench's trace six of thirteen came to one replica's four
//!   tenants and none to another's). Twice: a move adds its recompute to the
//!   pool's work, so it must shed clearly more than that from the home. The
//!   worker VMs of one Envoy count each other's requests too: a request
//!   mostly its own (a move included) is shared on the placement board like
//!   a placement ([`Policy::shares`]), so a move one VM makes is not undone
//!   by another that did not see it. Each VM decays the figures per request
//!   it routes or learns, so theirs agree closely, not exactly.
//!
//! In-flight counts are this policy instance's own (one Envoy worker VM);
//! queued prefill is what the replicas last reported (every 100 ms or so).

use std::collections::VecDeque;

use serde::Deserialize;

use super::{
    AgingMap, Choice, ConfigError, Event, Policy, Reason, Request, SlotCounters, rendezvous,
};
use crate::snapshot::{ReplicaRef, Snapshot};

/// Where [`PrefixAware`] places a prefix that no replica holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// The replica holding the fewest recently requested prefixes, resident
    /// or placed and not yet reported (ties: fewest chunks counted the same
    /// way, then the prefix's rendezvous order).
    #[default]
    Least,
    /// Of the first two replicas in the prefix's rendezvous order, the one
    /// holding fewer, counted as for [`Placement::Least`] (ties: the first).
    TwoChoices,
    /// The first replica in the prefix's rendezvous order: spread only as
    /// evenly as the hash happens to.
    Rendezvous,
}

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
    /// Queued prefill tokens a replica may report above `load_factor` times
    /// the mean before a request that is mostly its own spills off it; also
    /// the queued prefill at which a request mostly cached stays at a home
    /// over the in-flight bound, up to `spill_gap` over it (0: no bound on
    /// prefill, and the in-flight bound is hard).
    pub spill_tokens: u64,
    /// Routed requests over which the own prefill sent to each replica is
    /// remembered, for balancing requests that are mostly their own (0:
    /// no such balance).
    pub balance_window: u32,
    /// Fallbacks listed after the primary.
    pub max_fallbacks: usize,
    /// Where a prefix held nowhere goes.
    pub placement: Placement,
}

impl Default for PrefixAwareConfig {
    fn default() -> Self {
        Self {
            capacity: 200_000,
            load_factor: 1.25,
            spill_gap: 4,
            spill_tokens: 1024,
            balance_window: 64,
            max_fallbacks: 2,
            placement: Placement::default(),
        }
    }
}

/// A new prefix placed on a replica that does not report it yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    first_chunk: u64,
    replica: ReplicaRef,
    chunks: u64,
}

/// Placements remembered until their replica reports them.
const PENDING: usize = 32;

/// Prefixes (first chunks) remembered for placement: those of the last
/// `ROOTS / 2` requests routed or shared at least.
const ROOTS: usize = 1024;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct PrefixAware {
    config: PrefixAwareConfig,
    affinity: AgingMap<ReplicaRef>,
    in_flight: SlotCounters,
    /// Recent placements (this VM's and, from the board, the others'),
    /// dropped once their replica reports their first chunk.
    pending: VecDeque<Pending>,
    /// First chunks of recently routed and shared requests: the prefixes
    /// placement counts.
    roots: AgingMap<()>,
    /// Own chunks recently sent to each replica (see the module docs).
    recent: RecentPrefill,
}

/// Own chunks (past the matched prefix) routed to each replica, decaying per
/// routed request.
#[derive(Debug, Clone, Default)]
struct RecentPrefill {
    values: Vec<(ReplicaRef, f64)>,
}

impl RecentPrefill {
    fn get(&self, r: ReplicaRef) -> f64 {
        match self.values.get(r.slot()) {
            Some(&(owner, v)) if owner == r => v,
            _ => 0.0,
        }
    }

    /// Decays every replica's figure by `keep`, then adds `chunks` to `r`'s.
    fn route(&mut self, r: ReplicaRef, chunks: f64, keep: f64) {
        for v in &mut self.values {
            v.1 *= keep;
        }
        let slot = r.slot();
        if self.values.len() <= slot {
            self.values.resize(slot + 1, (r, 0.0));
        }
        let entry = &mut self.values[slot];
        if entry.0 != r {
            // A new replica in a reused slot starts from nothing.
            *entry = (r, 0.0);
        }
        entry.1 += chunks;
    }
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
            pending: VecDeque::new(),
            roots: AgingMap::new(ROOTS),
            recent: RecentPrefill::default(),
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

    /// The queued prefill tokens above which a replica of `snapshot` takes no
    /// request that is mostly its own: `load_factor * mean + spill_tokens`,
    /// from the replicas' reports; `None` when `spill_tokens` is 0.
    pub fn prefill_bound(&self, snapshot: &Snapshot) -> Option<u64> {
        if self.config.spill_tokens == 0 || snapshot.is_empty() {
            return None;
        }
        let mean = mean_queued(snapshot);
        Some((self.config.load_factor * mean).ceil() as u64 + self.config.spill_tokens)
    }

    /// Own chunks (past the matched prefix) recently sent to `replica`, as
    /// balancing requests mostly their own counts them.
    pub fn recent_prefill(&self, replica: ReplicaRef) -> f64 {
        self.recent.get(replica)
    }

    /// For a request mostly its own at `home`: of the replicas `ok` takes
    /// that report no more queued prefill than the mean, the one with the
    /// least own prefill recently sent, and that figure. The request moves
    /// there when the home's figure is above it by more than twice the
    /// chunks the move recomputes.
    fn lightest(
        &self,
        snapshot: &Snapshot,
        home: ReplicaRef,
        order: &[(u64, ReplicaRef)],
        ok: &dyn Fn(ReplicaRef) -> bool,
    ) -> Option<(ReplicaRef, f64)> {
        if self.config.balance_window == 0 {
            return None;
        }
        let mean = mean_queued(snapshot);
        // `min_by` keeps the first of equal minima: the rendezvous order.
        order
            .iter()
            .map(|&(_, r)| r)
            .filter(|&r| r != home && ok(r) && queued(snapshot, r) as f64 <= mean)
            .map(|r| (r, self.recent.get(r)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The figures a request with a known home was weighed by, for the
    /// decision header: the home's in-flight count and queued prefill
    /// against their bounds, the own prefill recently sent to it and to the
    /// lightest candidate of a move, and where it went when not home, that
    /// replica's.
    fn figures(
        &self,
        snapshot: &Snapshot,
        home: ReplicaRef,
        primary: ReplicaRef,
        bounds: (u64, Option<u64>),
        lightest: Option<f64>,
    ) -> Vec<(&'static str, u64)> {
        let queued = |r: ReplicaRef| queued(snapshot, r);
        let recent = |r: ReplicaRef| self.recent.get(r).round() as u64;
        let mut figures = vec![
            ("home_in_flight", self.in_flight.get(home)),
            ("in_flight_bound", bounds.0),
            ("home_queued", queued(home)),
        ];
        figures.extend(bounds.1.map(|b| ("prefill_bound", b)));
        figures.push(("home_recent", recent(home)));
        figures.extend(lightest.map(|l| ("lightest_recent", l.round() as u64)));
        if primary != home {
            figures.extend([
                ("primary_in_flight", self.in_flight.get(primary)),
                ("primary_queued", queued(primary)),
                ("primary_recent", recent(primary)),
            ]);
        }
        figures
    }

    /// Whether a request mostly cached at `home`, over the in-flight bound (`bound`) there,
    /// stays home: when the home reports `spill_tokens` or more queued prefill, up to
    /// `spill_gap` over the bound. The model server runs the shortest prefill work first, so
    /// at a home busy prefilling a cached request's few own tokens are computed in its next
    /// step, while the whole prompt it would compute elsewhere waits behind whatever
    /// prefill is there (bench run 31 moved six such requests, and each waited 30 to 72 s;
    /// run 34, with moves only to replicas reporting 1,024 fewer queued tokens, moved three,
    /// which waited 24 to 62 s, while the three it kept home waited 3 to 6 s). A home
    /// reporting less is decoding, not prefilling, and the bound alone decides. (A request
    /// mostly its own moves more prefill than its move recomputes: the prefill bound and
    /// the balance decide for it.)
    fn cached_stays_home(&self, snapshot: &Snapshot, home: ReplicaRef, bound: u64) -> bool {
        let margin = self.config.spill_tokens;
        margin > 0
            && queued(snapshot, home) >= margin
            && self.in_flight.get(home) < bound.saturating_add(self.config.spill_gap)
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

    /// The live replica reporting the longest contiguous run of `chunks` from
    /// the first (any tier), and that length; ties in `order`.
    fn deepest_resident(
        snapshot: &Snapshot,
        chunks: &[u64],
        order: &[(u64, ReplicaRef)],
    ) -> Option<(ReplicaRef, u32)> {
        let mut alive: Vec<ReplicaRef> = order.iter().map(|&(_, r)| r).collect();
        let mut best = None;
        for (i, &c) in chunks.iter().enumerate() {
            let holders = snapshot.holders(c);
            alive.retain(|r| holders.iter().any(|h| h.slot as usize == r.slot()));
            match alive.first() {
                Some(&r) => best = Some((r, i as u32 + 1)),
                None => break,
            }
        }
        best
    }

    /// Chunks replica `r` holds or is about to: those it reports resident,
    /// plus those of placements on it whose first chunk it does not report.
    pub fn placed_chunks(&self, snapshot: &Snapshot, r: ReplicaRef) -> u64 {
        let pending: u64 = self
            .pending
            .iter()
            .filter(|p| p.replica == r && !Self::reports(snapshot, p))
            .map(|p| p.chunks)
            .sum();
        snapshot.resident_chunks(r) + pending
    }

    /// Recently requested prefixes each replica slot holds or is about to:
    /// those it reports (any tier), plus placements on it whose first chunk
    /// it does not report.
    fn held_prefixes(&self, snapshot: &Snapshot) -> Vec<u64> {
        let mut per = vec![0u64; snapshot.slot_count()];
        let mut count = |slot: usize| {
            if let Some(n) = per.get_mut(slot) {
                *n += 1;
            }
        };
        for root in self.roots.keys() {
            for h in snapshot.holders(root) {
                count(h.slot as usize);
            }
        }
        for p in self.pending.iter().filter(|p| !Self::reports(snapshot, p)) {
            count(p.replica.slot());
        }
        per
    }

    fn reports(snapshot: &Snapshot, p: &Pending) -> bool {
        snapshot
            .holders(p.first_chunk)
            .iter()
            .any(|h| h.slot as usize == p.replica.slot())
    }

    /// Counts `own` chunks sent to `r` for the balance of own prefill.
    fn note_own(&mut self, r: ReplicaRef, own: u32) {
        if self.config.balance_window > 0 {
            let keep = 1.0 - 1.0 / f64::from(self.config.balance_window);
            self.recent.route(r, f64::from(own), keep);
        }
    }

    /// Remembers a placement until its replica reports it.
    fn note_placed(&mut self, chunks: &[u64], total: u64, r: ReplicaRef) {
        let Some(&first_chunk) = chunks.first() else {
            return;
        };
        self.pending.retain(|p| p.first_chunk != first_chunk);
        if self.pending.len() == PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Pending {
            first_chunk,
            replica: r,
            chunks: total,
        });
    }

    /// Where a prefix held nowhere goes (`order`: its rendezvous order).
    fn place(
        &self,
        snapshot: &Snapshot,
        order: &[(u64, ReplicaRef)],
    ) -> (Option<ReplicaRef>, Reason) {
        let replicas = order.iter().map(|&(_, r)| r);
        let prefixes = if self.config.placement == Placement::Rendezvous {
            Vec::new()
        } else {
            self.held_prefixes(snapshot)
        };
        // `min_by_key` keeps the first of equal minima.
        let least = |candidates: &mut dyn Iterator<Item = ReplicaRef>| {
            candidates.min_by_key(|&r| {
                (
                    prefixes.get(r.slot()).copied().unwrap_or(0),
                    self.placed_chunks(snapshot, r),
                )
            })
        };
        match self.config.placement {
            Placement::Rendezvous => (replicas.take(1).next(), Reason::Hash),
            Placement::TwoChoices => (least(&mut replicas.take(2)), Reason::Placed),
            Placement::Least => (least(&mut replicas.into_iter()), Reason::Placed),
        }
    }
}

/// Queued prefill tokens `r` last reported (0 when gone).
fn queued(snapshot: &Snapshot, r: ReplicaRef) -> u64 {
    snapshot
        .get(r)
        .map_or(0, |rep| rep.load.queued_prefill_tokens)
}

/// The replicas' mean reported queued prefill tokens (0 with none).
fn mean_queued(snapshot: &Snapshot) -> f64 {
    let total: u64 = snapshot.replicas().map(|(r, _)| queued(snapshot, r)).sum();
    total as f64 / snapshot.len().max(1) as f64
}

impl Default for PrefixAware {
    fn default() -> Self {
        // The default configuration is valid by construction.
        Self {
            affinity: AgingMap::new(PrefixAwareConfig::default().capacity),
            config: PrefixAwareConfig::default(),
            in_flight: SlotCounters::default(),
            pending: VecDeque::new(),
            roots: AgingMap::new(ROOTS),
            recent: RecentPrefill::default(),
        }
    }
}

impl Policy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix-aware"
    }

    fn shares_placements(&self) -> bool {
        true
    }

    fn shares(&self, request: &Request<'_>, choice: &Choice) -> bool {
        // Placements, and with the balance on, requests mostly their own
        // where they went (a move included): the other VMs count the own
        // prefill each replica was sent as this one does.
        choice.reason.is_placement()
            || (self.config.balance_window > 0
                && choice.own_chunks(request) > choice.matched_chunks)
    }

    fn select(&self, snapshot: &Snapshot, request: &Request<'_>) -> Choice {
        if snapshot.is_empty() {
            return Choice::none();
        }
        let bound = self.load_bound(snapshot);
        let prefill_bound = self.prefill_bound(snapshot);
        // No identity: least in flight; the key only orders the fallbacks.
        let key = request.chunks.first().copied().unwrap_or(0);
        // Rendezvous order for this prefix: the spill and fallback order.
        let mut order: Vec<(u64, ReplicaRef)> = snapshot
            .replicas()
            .map(|(r, rep)| (rendezvous(key, rep.key), r))
            .collect();
        order.sort_unstable_by_key(|&(score, _)| std::cmp::Reverse(score));
        let (preferred, matched, reason) = if request.chunks.is_empty() {
            let least = order
                .iter()
                .map(|&(_, r)| r)
                .min_by_key(|&r| self.in_flight.get(r));
            (least, 0, Reason::NoPrompt)
        } else {
            match self.deepest_affinity(snapshot, request.chunks) {
                Some((r, m)) => (Some(r), m, Reason::Affinity),
                None => match Self::deepest_resident(snapshot, request.chunks, &order) {
                    Some((r, m)) => (Some(r), m, Reason::Resident),
                    None => {
                        let (r, reason) = self.place(snapshot, &order);
                        (r, 0, reason)
                    }
                },
            }
        };
        let Some(preferred) = preferred else {
            return Choice::none();
        };
        // The prefill bound holds for a request with a known home whose own
        // part outweighs what that home has cached (not for a new prefix:
        // its placement already picks the emptiest replica, and is shared).
        let total = request.chunks.len() as u32;
        let mostly_own = matched > 0 && total.saturating_sub(matched) > matched;
        let in_flight_ok = |r: ReplicaRef| self.in_flight.get(r) < bound;
        let under_bound = |r: ReplicaRef| {
            let over_prefill = mostly_own && prefill_bound.is_some_and(|b| queued(snapshot, r) > b);
            in_flight_ok(r) && !over_prefill
        };
        let lightest = mostly_own
            .then(|| self.lightest(snapshot, preferred, &order, &under_bound))
            .flatten();
        let (primary, matched, reason) = if under_bound(preferred) {
            match lightest
                .filter(|&(_, load)| self.recent.get(preferred) - load > 2.0 * f64::from(matched))
            {
                Some((lighter, _)) => (lighter, 0, Reason::Spilled),
                None => (preferred, matched, reason),
            }
        } else {
            // A request mostly cached stays at a home busy prefilling, for a while.
            let stays =
                !mostly_own && matched > 0 && self.cached_stays_home(snapshot, preferred, bound);
            // Some replica is always under the in-flight bound (at least the
            // mean plus one request), but none may be under the prefill
            // bound as well: then the request stays under the in-flight one.
            // A request mostly its own goes to the least queued prefill;
            // any other to the first in rendezvous order, its steady second
            // holder.
            let queued = |r: ReplicaRef| if mostly_own { queued(snapshot, r) } else { 0 };
            // Among equal queues (idle replicas report none), a request mostly
            // its own goes to the least own prefill recently sent, as a move
            // does; `min_by` keeps the first of equal minima.
            let recent = |r: ReplicaRef| {
                if mostly_own { self.recent.get(r) } else { 0.0 }
            };
            let others = || order.iter().map(|&(_, r)| r).filter(|&r| r != preferred);
            let spill = if stays {
                preferred
            } else {
                others()
                    .filter(|&r| under_bound(r))
                    .min_by(|&a, &b| {
                        queued(a)
                            .cmp(&queued(b))
                            .then(recent(a).total_cmp(&recent(b)))
                    })
                    .or_else(|| {
                        (!in_flight_ok(preferred)).then(|| others().find(|&r| in_flight_ok(r)))?
                    })
                    .unwrap_or(preferred)
            };
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
        // A request mostly its own, spilled, or kept at a home over the in-flight
        // bound: the figures that decided.
        let figures = if mostly_own || primary != preferred || !in_flight_ok(preferred) {
            self.figures(
                snapshot,
                preferred,
                primary,
                (bound, prefill_bound),
                lightest.map(|(_, load)| load),
            )
        } else {
            Vec::new()
        };
        Choice {
            primary: Some(primary),
            fallbacks,
            matched_chunks: matched,
            reason,
            figures,
        }
    }

    fn observe(&mut self, snapshot: &Snapshot, event: &Event<'_>) {
        // Placements their replica now reports (or that lost their replica)
        // are counted from the report alone, and not again once evicted.
        self.pending
            .retain(|p| snapshot.get(p.replica).is_some() && !Self::reports(snapshot, p));
        match *event {
            Event::Routed { request, choice } => {
                let Some(r) = choice.primary else { return };
                if snapshot.get(r).is_none() {
                    return;
                }
                self.in_flight.add(r, 1);
                self.note_own(r, choice.own_chunks(request));
                if let Some(&root) = request.chunks.first() {
                    self.roots.insert(root, ());
                }
                if choice.reason.is_placement() {
                    self.note_placed(request.chunks, request.chunks.len() as u64, r);
                }
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
            Event::Shared {
                chunks,
                total_chunks,
                own_chunks,
                placed,
                replica,
            } => {
                if snapshot.get(replica).is_none() {
                    return;
                }
                self.note_own(replica, own_chunks);
                if let Some(&root) = chunks.first() {
                    self.roots.insert(root, ());
                }
                if !placed {
                    return;
                }
                self.note_placed(chunks, u64::from(total_chunks), replica);
                for &c in chunks {
                    self.affinity.insert(c, replica);
                }
            }
        }
    }
}
