//! The replica registry: what every replica reported (registration, load,
//! residency), validated message by message. A malformed report is refused
//! with a reason and changes nothing; a sequence gap asks for a resync.
//! Residency is kept per shard (`chunk % shards`) so that publishing only
//! re-versions the shards a report touched. The published resources share the
//! registry's lists (`Arc`) and are encoded only when sent, so residency is
//! held once (changing a list a snapshot still holds copies that one list).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvmesh_control_plane_xds::{Resource, type_url};
use kvmesh_plugins_sdk::proto::{
    Load, Register, ReplicaInfo, ReplicaReport, Tier, TierChunks, replica_report,
};
use tokio::time::Instant;

use crate::config::{Config, PoolSpec};
use crate::shard_body::ShardBody;

/// Most chunks one report may carry (a snapshot of a big cache is sent in one
/// message; gRPC's message size limit bounds it too).
pub const MAX_CHUNKS_PER_REPORT: usize = 4_000_000;

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("empty report (no event set)")]
    Empty,
    #[error("first report on a stream must be register")]
    NotRegistered,
    #[error("already registered on this stream")]
    Reregister,
    #[error("invalid register: {0}")]
    BadRegister(String),
    #[error("invalid tier value {0}")]
    BadTier(i32),
    #[error("tier {tier}: used {used} > capacity {capacity}")]
    OverCapacity { tier: i32, used: u64, capacity: u64 },
    #[error("report carries {0} chunks, more than the limit {MAX_CHUNKS_PER_REPORT}")]
    TooLarge(usize),
    #[error("tier {0} listed twice")]
    DuplicateTier(i32),
}

/// What the stream should answer after a report was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Registered(String),
    /// Sequence gap (or a delta before any snapshot): ask for a snapshot.
    Resync(String),
    Ok,
}

/// Per-stream context: which replica the stream registered.
#[derive(Debug, Default)]
pub struct StreamCtx {
    pub id: u64,
    pub replica: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    pub pool: String,
    pub address: SocketAddr,
    pub register: Register,
    pub load: Load,
    /// shard -> tier -> chunks, sorted (a sorted Vec is a third of a
    /// BTreeSet's memory, and shards are small, so inserts stay cheap).
    /// Shared with the published resources; replaced, never edited in place.
    shards: Vec<BTreeMap<i32, Arc<Vec<u64>>>>,
    dirty_shards: BTreeSet<u32>,
    encoded: Vec<Option<Arc<Resource>>>,
    /// Next residency seq expected; `None` until a snapshot arrived.
    next_seq: Option<u64>,
    pub stream: Option<u64>,
    pub last_seen: Instant,
    pub registered_at: Instant,
    pub rejected: u64,
}

impl Replica {
    pub fn resident_chunks(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|s| s.values())
            .map(|c| c.len())
            .sum()
    }

    pub fn connected(&self) -> bool {
        self.stream.is_some()
    }

    /// Residency per tier (sorted), for display.
    pub fn residency_by_tier(&self) -> BTreeMap<i32, usize> {
        let mut out = BTreeMap::new();
        for s in &self.shards {
            for (t, c) in s {
                *out.entry(*t).or_default() += c.len();
            }
        }
        out
    }

    fn shard_of(&self, chunk: u64) -> usize {
        (chunk % self.shards.len() as u64) as usize
    }

    /// Applies a change in bulk: chunks are grouped per (shard, tier), then
    /// each touched list is filtered or merged once (sorted, deduplicated).
    fn apply(&mut self, added: &[TierChunks], removed: &[TierChunks]) {
        let mut groups: BTreeMap<(usize, i32), Vec<u64>> = BTreeMap::new();
        for r in removed {
            for &c in &r.chunks {
                groups
                    .entry((self.shard_of(c), r.tier))
                    .or_default()
                    .push(c);
            }
        }
        for ((s, tier), mut gone) in std::mem::take(&mut groups) {
            gone.sort_unstable();
            if let Some(set) = self.shards[s].get_mut(&tier) {
                let hit = set.iter().filter(|c| gone.binary_search(c).is_ok()).count();
                if hit > 0 {
                    let mut kept = Vec::with_capacity(set.len() - hit);
                    kept.extend(set.iter().filter(|c| gone.binary_search(c).is_err()));
                    *set = Arc::new(kept);
                    self.dirty_shards.insert(s as u32);
                }
            }
        }
        for a in added {
            for &c in &a.chunks {
                groups
                    .entry((self.shard_of(c), a.tier))
                    .or_default()
                    .push(c);
            }
        }
        for ((s, tier), mut new) in groups {
            new.sort_unstable();
            new.dedup();
            let set = self.shards[s].entry(tier).or_default();
            if let Some(merged) = merge_sorted(set, &new) {
                *set = Arc::new(merged);
                self.dirty_shards.insert(s as u32);
            }
        }
        for s in &mut self.shards {
            s.retain(|_, set| !set.is_empty());
        }
    }

    fn clear(&mut self) {
        for (i, s) in self.shards.iter_mut().enumerate() {
            if !s.is_empty() {
                s.clear();
                self.dirty_shards.insert(i as u32);
            }
        }
    }

    pub fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            id: self.id.clone(),
            address: self.register.address.clone(),
            load: Some(self.load.clone()),
        }
    }

    /// The ResidencyShard resources of this replica (re-versioning dirty
    /// ones; bodies are encoded when sent).
    pub fn shard_resources(&mut self) -> impl Iterator<Item = &Arc<Resource>> {
        let count = self.shards.len() as u32;
        let pool: Arc<str> = self.pool.as_str().into();
        let id: Arc<str> = self.id.as_str().into();
        for s in std::mem::take(&mut self.dirty_shards) {
            let shard = &self.shards[s as usize];
            self.encoded[s as usize] = if shard.is_empty() {
                None
            } else {
                let body = ShardBody {
                    pool: pool.clone(),
                    replica_id: id.clone(),
                    shard: s,
                    shard_count: count,
                    tiers: shard.iter().map(|(t, set)| (*t, set.clone())).collect(),
                };
                let name = format!("{}/{}/{}", self.pool, self.id, s);
                Some(Arc::new(Resource::lazy(
                    name,
                    type_url::RESIDENCY_SHARD,
                    body.version(),
                    Arc::new(body),
                )))
            };
        }
        self.encoded.iter().flatten()
    }
}

/// `set` with `new` (sorted, deduplicated) merged in, as a fresh list of
/// exact capacity; `None` when `new` adds nothing.
fn merge_sorted(set: &[u64], new: &[u64]) -> Option<Vec<u64>> {
    let fresh = new.iter().filter(|c| set.binary_search(c).is_err()).count();
    if fresh == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(set.len() + fresh);
    let (mut i, mut j) = (0, 0);
    while i < set.len() && j < new.len() {
        match set[i].cmp(&new[j]) {
            std::cmp::Ordering::Less => {
                out.push(set[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(new[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(set[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&set[i..]);
    out.extend_from_slice(&new[j..]);
    Some(out)
}

fn check_tier(t: i32) -> Result<(), Rejection> {
    match Tier::try_from(t) {
        Ok(Tier::Unspecified) | Err(_) => Err(Rejection::BadTier(t)),
        Ok(_) => Ok(()),
    }
}

fn check_chunks(lists: &[&[TierChunks]]) -> Result<(), Rejection> {
    let mut n = 0usize;
    for list in lists {
        let mut seen = HashSet::new();
        for tc in *list {
            check_tier(tc.tier)?;
            if !seen.insert(tc.tier) {
                return Err(Rejection::DuplicateTier(tc.tier));
            }
            n += tc.chunks.len();
        }
    }
    if n > MAX_CHUNKS_PER_REPORT {
        return Err(Rejection::TooLarge(n));
    }
    Ok(())
}

fn check_load(load: &Load) -> Result<(), Rejection> {
    for u in &load.kv {
        check_tier(u.tier)?;
        if u.capacity_blocks > 0 && u.used_blocks > u.capacity_blocks {
            return Err(Rejection::OverCapacity {
                tier: u.tier,
                used: u.used_blocks,
                capacity: u.capacity_blocks,
            });
        }
    }
    Ok(())
}

/// All replicas, by id.
#[derive(Debug)]
pub struct Registry {
    config: Arc<Config>,
    /// The pools served now: the config file's, then those from Kubernetes.
    pools: Arc<Vec<PoolSpec>>,
    /// Bumped when the pool set changes (listeners, routes, clusters to rebuild).
    pub pools_generation: u64,
    replicas: BTreeMap<String, Replica>,
    /// Bumped on every change that affects what is published.
    pub generation: u64,
    /// Bumped when membership (EDS) changes.
    pub members_generation: u64,
    /// Bumped when any residency (the set of ResidencyShard resources) may
    /// have changed, so publishing can skip rebuilding that set otherwise.
    pub residency_generation: u64,
    next_stream: u64,
}

impl Registry {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            pools: Arc::new(config.pools.clone()),
            pools_generation: 1,
            config,
            replicas: BTreeMap::new(),
            generation: 0,
            members_generation: 0,
            residency_generation: 0,
            next_stream: 0,
        }
    }

    pub fn replicas(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.values()
    }

    pub fn replicas_mut(&mut self) -> impl Iterator<Item = &mut Replica> {
        self.replicas.values_mut()
    }

    pub fn get(&self, id: &str) -> Option<&Replica> {
        self.replicas.get(id)
    }

    pub fn open_stream(&mut self) -> StreamCtx {
        self.next_stream += 1;
        StreamCtx {
            id: self.next_stream,
            replica: None,
        }
    }

    /// The stream ended; the replica stays until it has been silent too long.
    pub fn close_stream(&mut self, ctx: &StreamCtx) {
        if let Some(id) = &ctx.replica
            && let Some(r) = self.replicas.get_mut(id)
            && r.stream == Some(ctx.id)
        {
            r.stream = None;
        }
    }

    /// The pools served now.
    pub fn pools(&self) -> Arc<Vec<PoolSpec>> {
        self.pools.clone()
    }

    pub fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn pool_for_model(&self, model: &str) -> Option<&PoolSpec> {
        self.pools.iter().find(|p| p.model == model)
    }

    /// Replaces the pool set (checked by the caller). Each replica moves to the pool now
    /// serving its model; one whose model no pool serves any more is dropped (its stream is
    /// told to register again on its next report, and is refused until a pool serves it).
    pub fn set_pools(&mut self, pools: Arc<Vec<PoolSpec>>) {
        if *pools == *self.pools {
            return;
        }
        self.pools = pools;
        self.pools_generation += 1;
        self.generation += 1;
        self.members_generation += 1;
        self.residency_generation += 1;
        let pools = self.pools.clone();
        self.replicas.retain(
            |_, r| match pools.iter().find(|p| p.model == r.register.model) {
                Some(p) => {
                    if r.pool != p.name {
                        r.pool = p.name.clone();
                        // Residency resources are named by pool: re-encode them all.
                        r.dirty_shards.extend(0..r.shards.len() as u32);
                    }
                    true
                }
                None => false,
            },
        );
    }

    fn validate_register(&self, reg: &Register) -> Result<SocketAddr, Rejection> {
        let bad = |m: String| Err(Rejection::BadRegister(m));
        if reg.replica_id.is_empty() || reg.replica_id.contains('/') || reg.replica_id.len() > 256 {
            return bad(format!(
                "replica_id {:?} must be 1-256 characters without '/'",
                reg.replica_id
            ));
        }
        let Some(pool) = self.pool_for_model(&reg.model) else {
            return bad(format!("no pool serves model {:?}", reg.model));
        };
        if reg.chunk_bytes != 0 && reg.chunk_bytes != pool.chunk_bytes {
            return bad(format!(
                "chunk_bytes {} differs from pool {}'s {}",
                reg.chunk_bytes, pool.name, pool.chunk_bytes
            ));
        }
        for u in &reg.capacity {
            check_tier(u.tier).map_err(|e| Rejection::BadRegister(e.to_string()))?;
        }
        // An IP, not a host name: Envoy's EDS endpoints are not resolved.
        let Ok(addr) = reg.address.parse::<SocketAddr>() else {
            return bad(format!("address {:?} is not ip:port", reg.address));
        };
        Ok(addr)
    }

    /// Applies one report from the stream `ctx`. On error nothing changed.
    pub fn apply(
        &mut self,
        ctx: &mut StreamCtx,
        report: ReplicaReport,
        now: Instant,
    ) -> Result<Applied, Rejection> {
        let event = report.event.ok_or(Rejection::Empty)?;
        if let replica_report::Event::Register(reg) = event {
            if ctx.replica.is_some() {
                return Err(Rejection::Reregister);
            }
            let address = self.validate_register(&reg)?;
            let pool = self
                .pool_for_model(&reg.model)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            let shards = self.config.residency_shards as usize;
            let id = reg.replica_id.clone();
            let old = self.replicas.remove(&id);
            let mut replica = Replica {
                id: id.clone(),
                pool,
                address,
                register: reg,
                load: Load::default(),
                shards: vec![BTreeMap::new(); shards],
                dirty_shards: BTreeSet::new(),
                encoded: vec![None; shards],
                next_seq: None,
                stream: Some(ctx.id),
                last_seen: now,
                registered_at: now,
                rejected: 0,
            };
            // A re-registration keeps what was known until the new snapshot
            // replaces it, so a reconnect does not blank the residency.
            if let Some(old) = old
                && old.pool == replica.pool
            {
                replica.shards = old.shards;
                replica.encoded = old.encoded;
                replica.dirty_shards = old.dirty_shards;
                replica.load = old.load;
                replica.rejected = old.rejected;
                if old.address != replica.address {
                    self.members_generation += 1;
                }
            } else {
                self.members_generation += 1;
            }
            self.replicas.insert(id.clone(), replica);
            ctx.replica = Some(id.clone());
            self.generation += 1;
            self.residency_generation += 1;
            return Ok(Applied::Registered(id));
        }
        let id = ctx.replica.clone().ok_or(Rejection::NotRegistered)?;
        let Some(r) = self.replicas.get_mut(&id) else {
            // Dropped for silence while the stream stayed open: it must register again.
            ctx.replica = None;
            return Err(Rejection::NotRegistered);
        };
        if r.stream != Some(ctx.id) {
            // A newer stream took over this replica id.
            return Err(Rejection::NotRegistered);
        }
        let applied = match event {
            replica_report::Event::Register(_) => unreachable_register(),
            replica_report::Event::Load(load) => {
                check_load(&load)?;
                if r.load != load {
                    r.load = load;
                    self.generation += 1;
                }
                Applied::Ok
            }
            replica_report::Event::Delta(d) => {
                check_chunks(&[&d.added, &d.removed])?;
                match r.next_seq {
                    Some(n) if n == d.seq => {
                        r.next_seq = Some(n + 1);
                        r.apply(&d.added, &d.removed);
                        self.generation += 1;
                        self.residency_generation += 1;
                        Applied::Ok
                    }
                    Some(n) => {
                        r.next_seq = None;
                        Applied::Resync(format!("delta seq {} but expected {n}", d.seq))
                    }
                    None => Applied::Resync(format!("delta seq {} before a snapshot", d.seq)),
                }
            }
            replica_report::Event::Snapshot(s) => {
                check_chunks(&[&s.resident])?;
                r.clear();
                r.apply(&s.resident, &[]);
                r.next_seq = Some(s.seq + 1);
                self.generation += 1;
                self.residency_generation += 1;
                Applied::Ok
            }
            replica_report::Event::Cleared(c) => {
                r.clear();
                r.next_seq = Some(c.seq + 1);
                self.generation += 1;
                self.residency_generation += 1;
                Applied::Ok
            }
        };
        r.last_seen = now;
        Ok(applied)
    }

    /// Counts a refused report against the stream's replica (for display).
    pub fn note_rejected(&mut self, ctx: &StreamCtx) {
        if let Some(id) = &ctx.replica
            && let Some(r) = self.replicas.get_mut(id)
        {
            r.rejected += 1;
        }
    }

    /// Drops replicas silent for longer than `silence`; returns their ids.
    pub fn expire(&mut self, now: Instant, silence: Duration) -> Vec<String> {
        let gone: Vec<String> = self
            .replicas
            .values()
            .filter(|r| now.saturating_duration_since(r.last_seen) > silence)
            .map(|r| r.id.clone())
            .collect();
        for id in &gone {
            self.replicas.remove(id);
        }
        if !gone.is_empty() {
            self.generation += 1;
            self.members_generation += 1;
            self.residency_generation += 1;
        }
        gone
    }

    /// Live members of a pool, sorted by id.
    pub fn members(&self, pool: &str) -> Vec<&Replica> {
        self.replicas.values().filter(|r| r.pool == pool).collect()
    }
}

fn unreachable_register() -> Applied {
    // Register is handled before the match; keep the match exhaustive
    // without a panic path.
    Applied::Ok
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
