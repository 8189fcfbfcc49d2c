//! The engine thread: admission, step planning, the model call, sampling, release.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvmesh_gpu_server_kv::{BlockHash, BlockManager, BlockTable, KvConfig, ResidencyEvent, Tier};
use kvmesh_gpu_server_model::{KvPool, Model, SeqInput};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;

use crate::report::{CostStatus, LoadReport, StateUpdate, Status, TierLoad, TierStatus};
use crate::sampling::sample;
use crate::tiers::{TierConfig, Tiers};
use crate::{Event, FinishReason, Request, SubmitError};

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub block_tokens: usize,
    pub num_blocks: usize,
    /// Tokens one step may run (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Requests waiting for admission at most; more are refused (HTTP 429).
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_tokens: 16,
            num_blocks: 1024,
            step_tokens: 512,
            max_running: 16,
            max_waiting: 64,
        }
    }
}

enum Cmd {
    Submit(Box<Request>),
    Subscribe(mpsc::UnboundedSender<StateUpdate>),
    ClearCache,
    Contents(tokio::sync::oneshot::Sender<Vec<TierBlocks>>),
}

/// A tier and its cached blocks, `(slot, block hash)` by slot.
pub type TierBlocks = (Tier, Vec<(u32, u64)>);

/// The caller's side of the engine; cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    waiting: Arc<AtomicUsize>,
    status: Arc<Mutex<Status>>,
    cfg: EngineConfig,
    context_length: usize,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Submit(_) => "Submit",
            Cmd::Subscribe(_) => "Subscribe",
            Cmd::ClearCache => "ClearCache",
            Cmd::Contents(_) => "Contents",
        })
    }
}

impl EngineHandle {
    /// Queues a request, or refuses it at once when the queue is full or it cannot fit.
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        let n = req.prompt.len();
        if n == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if n >= self.context_length {
            return Err(SubmitError::TooLong {
                prompt: n,
                context: self.context_length,
            });
        }
        let need = (n + 1).div_ceil(self.cfg.block_tokens);
        if need > self.cfg.num_blocks {
            return Err(SubmitError::TooLarge {
                need,
                have: self.cfg.num_blocks,
            });
        }
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.cfg.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(Cmd::Submit(Box::new(req))).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// A stream of state updates: a snapshot of the resident chunks first, then deltas and
    /// load. Subscribing again is a resync.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<StateUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.tx.send(Cmd::Subscribe(tx));
        rx
    }

    /// Drops every unreferenced cached block (tests and operators).
    pub fn clear_cache(&self) {
        let _ = self.tx.send(Cmd::ClearCache);
    }

    /// The cached blocks of every enabled tier: `(slot, block hash)` by slot (device: block
    /// id). Answered between engine steps.
    pub async fn tier_contents(&self) -> Vec<TierBlocks> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Cmd::Contents(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }
}

struct Seq {
    req: Box<Request>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    table: BlockTable,
    rng: StdRng,
    started: bool,
    /// Chunks already mapped to sealed blocks.
    chunks_mapped: usize,
    /// Its disk blocks were read ahead while it waited.
    prefetched: bool,
    /// Hashes of the full blocks of `tokens` when it was admitted: the blocks its prefill
    /// seals, in order (what a waiting request with the same prefix can wait for).
    admitted_hashes: Vec<BlockHash>,
    /// It was held back at least once for another sequence's prefill of its prefix.
    waited: bool,
    /// Steps in a row its partial prefill chunk gave way to shorter prefill work.
    deferred: u32,
    /// Prompt tokens found cached (any tier) when it was queued: while it waits, what it
    /// will not prefill (see [`Seq::queued_prefill`]).
    cached_hint: usize,
}

/// Steps in a row a partial prefill chunk gives way to other prefill work (see
/// [`Core::step`]).
const MAX_DEFERRED: u32 = 4;

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
    fn pending(&self) -> usize {
        self.tokens.len() - self.table.computed()
    }
    /// Prompt tokens it still has to prefill, as the load report counts them: a waiting
    /// request is counted without the prefix found cached when it was queued (it will adopt
    /// it, unless evicted meanwhile); a decoding sequence counts none; and, as the report
    /// always did, a prompt with nothing computed or cached counts one token less.
    fn queued_prefill(&self) -> usize {
        let done = self.table.computed().max(self.cached_hint).max(1);
        self.prompt_len.saturating_sub(done)
    }
    fn send(&self, e: Event) {
        let _ = self.req.events.send(e);
    }
}

/// The engine: owns the model, the logical cache and the physical pool.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Starts the engine thread over `model` with a device tier only; `stop` lists the
    /// tokens that end generation.
    pub fn start(model: Arc<Model>, stop: Vec<u32>, cfg: EngineConfig) -> EngineHandle {
        Self::start_tiered(model, stop, cfg, &TierConfig::default())
    }

    /// Starts the engine thread with the lower tiers of `tiers` (a disk tier that cannot be
    /// used is turned off with a warning; valid blocks already on disk are served).
    pub fn start_tiered(
        model: Arc<Model>,
        stop: Vec<u32>,
        cfg: EngineConfig,
        tiers: &TierConfig,
    ) -> EngineHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        // A GPU model gets its pool in GPU memory; failing to allocate it is fatal at start.
        let pool = KvPool::for_model(&model, cfg.num_blocks, cfg.block_tokens)
            .unwrap_or_else(|e| panic!("KV pool of {} blocks: {e}", cfg.num_blocks));
        let (mut tiers, host_blocks, disk_blocks, found) = Tiers::new(tiers, &pool);
        let mut mgr = BlockManager::tiered(
            KvConfig {
                block_tokens: cfg.block_tokens,
                num_blocks: cfg.num_blocks,
            },
            host_blocks,
            disk_blocks,
        );
        tiers.disk_status.restored = mgr.restore_disk(found) as u64;
        tiers.calibrate(&pool);
        let status = Arc::new(Mutex::new(Status {
            block_tokens: cfg.block_tokens,
            pool_bytes: pool.total_bytes(),
            pool_bytes_per_token: pool.bytes_per_token(),
            ..Status::default()
        }));
        let handle = EngineHandle {
            tx,
            waiting: waiting.clone(),
            status: status.clone(),
            cfg,
            context_length: model.config().context_length,
        };
        let mut core = Core {
            mgr,
            tiers,
            resident: Default::default(),
            resident_seq: u64::MAX,
            pool,
            model,
            stop,
            cfg,
            rx,
            waiting_count: waiting,
            status,
            waiting: VecDeque::new(),
            running: Vec::new(),
            subscribers: Vec::new(),
            seq: 0,
            last_load: None,
            stats: Status::default(),
            copies: Vec::new(),
        };
        // The first status (tiers, disk scan) is there before `start` returns.
        core.publish(true);
        std::thread::Builder::new()
            .name("kvmesh-engine".into())
            .spawn(move || core.run())
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start engine thread: {e}"));
        handle
    }
}

struct Core {
    /// `(shared, fresh)` block copies due before this step's forward pass (see
    /// [`BlockTable::unshare_last`]); `shared` is held until copied.
    copies: Vec<(u32, u32)>,
    mgr: BlockManager,
    tiers: Tiers,
    /// Resident chunks per tier as of `resident_seq`.
    resident: [Vec<u64>; 3],
    resident_seq: u64,
    pool: KvPool,
    model: Arc<Model>,
    stop: Vec<u32>,
    cfg: EngineConfig,
    rx: mpsc::UnboundedReceiver<Cmd>,
    waiting_count: Arc<AtomicUsize>,
    status: Arc<Mutex<Status>>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    subscribers: Vec<mpsc::UnboundedSender<StateUpdate>>,
    seq: u64,
    last_load: Option<(LoadReport, Instant)>,
    stats: Status,
}

impl Core {
    fn run(&mut self) {
        loop {
            self.tiers.poll(&mut self.mgr);
            if self.waiting.is_empty() && self.running.is_empty() {
                // Idle: let queued disk writes land so the status is final.
                self.tiers.flush(&mut self.mgr);
                self.publish(true);
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            self.drop_cancelled();
            self.step();
            self.publish(false);
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Submit(req) => {
                let rng = match req.params.seed {
                    Some(s) => StdRng::seed_from_u64(s),
                    None => StdRng::from_os_rng(),
                };
                let table = BlockTable::new(self.cfg.block_tokens);
                let hashes = table.prefix_hashes(&req.prompt, req.prompt.len());
                let cached_hint = self.mgr.cached_prefix(&hashes) * self.cfg.block_tokens;
                self.waiting.push_back(Seq {
                    tokens: req.prompt.clone(),
                    prompt_len: req.prompt.len(),
                    table,
                    rng,
                    started: false,
                    chunks_mapped: 0,
                    prefetched: false,
                    admitted_hashes: Vec::new(),
                    waited: false,
                    deferred: 0,
                    cached_hint,
                    req,
                });
            }
            Cmd::Subscribe(tx) => {
                // Pending events first, so the snapshots are exactly the state at `seq`.
                self.publish(false);
                let mut ok = true;
                for tier in Tier::ALL {
                    if tier != Tier::Device && self.mgr.capacity(tier) == 0 {
                        continue;
                    }
                    ok &= tx
                        .send(StateUpdate::Snapshot {
                            seq: self.seq,
                            tier,
                            resident: self.mgr.resident_chunks(tier),
                        })
                        .is_ok();
                }
                if ok {
                    self.subscribers.push(tx);
                }
                self.last_load = None;
            }
            Cmd::Contents(tx) => {
                let v = Tier::ALL
                    .into_iter()
                    .filter(|&t| t == Tier::Device || self.mgr.capacity(t) > 0)
                    .map(|t| (t, self.mgr.tier_contents(t)))
                    .collect();
                let _ = tx.send(v);
            }
            Cmd::ClearCache => {
                self.mgr.clear_cache();
                let moves = self.mgr.take_moves();
                self.tiers.apply(&mut self.pool, moves);
                self.tiers.trim_staged(&self.mgr);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.req.events.is_closed());
        let gone = before - self.waiting.len();
        self.waiting_count.fetch_sub(gone, Ordering::SeqCst);
        self.stats.cancelled += gone as u64;
        let mgr = &mut self.mgr;
        let mut cancelled = 0;
        self.running.retain_mut(|s| {
            if s.req.events.is_closed() {
                s.table.release(mgr);
                cancelled += 1;
                false
            } else {
                true
            }
        });
        self.stats.cancelled += cancelled;
    }

    /// Plans and runs one step.
    ///
    /// Shortest work first, so that a long prefill holds up neither decoding nor a short
    /// request queued behind it: the running sequences whose pending tokens fit in what is
    /// left of the budget (decode tokens, the last chunk of a prefill), oldest first; then
    /// waiting requests are admitted; then the prefills that do not fit (partial chunks)
    /// take what is left, oldest first. A partial chunk is deferred while the step has other
    /// prefill work; after [`MAX_DEFERRED`] steps in a row it is planned in the first pass,
    /// taking what is left before any admission, so a steady stream of short requests slows
    /// a long prefill but cannot starve it. (Before, running sequences went first in age
    /// order and a partial chunk took the whole budget: on the CPU demo replicas a
    /// 2,300-token prompt kept every request that arrived after it from its first token,
    /// and from decoding, for 15-25 s.)
    fn step(&mut self) {
        let mut budget = self.cfg.step_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        let mut partial: Vec<usize> = Vec::new();
        let mut blocked = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let mut take = self.running[i].pending();
            if take > budget {
                if self.running[i].deferred < MAX_DEFERRED {
                    partial.push(i);
                    i += 1;
                    continue;
                }
                // Deferred long enough: this step is its own.
                take = budget;
            }
            let target = self.running[i].table.computed() + take;
            let mgr = &mut self.mgr;
            if self.running[i].table.reserve(mgr, target).is_err() {
                // Out of blocks: preempt the newest other sequence and retry; alone, fail.
                if self.running.len() - 1 > i {
                    self.preempt_last();
                    continue;
                }
                if plan.is_empty() && self.running.len() == 1 {
                    let mut s = self.running.remove(0);
                    s.table.release(&mut self.mgr);
                    s.send(Event::Failed("KV cache too small for this sequence".into()));
                    continue;
                }
                blocked = true;
                break;
            }
            self.running[i].deferred = 0;
            plan.push((i, take));
            budget -= take;
            i += 1;
        }
        self.admit(&mut plan, &mut budget, blocked);
        // The partial chunks, oldest first.
        let mut starved = None;
        for p in partial {
            let other_prefill = plan.iter().any(|&(_, t)| t > 1);
            let s = &mut self.running[p];
            if budget == 0 || other_prefill {
                s.deferred += 1;
                continue;
            }
            let take = s.pending().min(budget);
            let target = s.table.computed() + take;
            if s.table.reserve(&mut self.mgr, target).is_err() {
                starved.get_or_insert(p);
                break;
            }
            s.deferred = 0;
            plan.push((p, take));
            budget -= take;
        }
        if plan.is_empty()
            && let Some(p) = starved
        {
            // Nothing runs and the oldest partial prefill has no blocks: free some, as the
            // first pass does, so the engine cannot stall.
            if self.running.len() - 1 > p {
                self.preempt_last();
            } else if self.running.len() == 1 {
                let mut s = self.running.remove(0);
                s.table.release(&mut self.mgr);
                s.send(Event::Failed("KV cache too small for this sequence".into()));
            }
        }
        self.prepare_blocks();
        if plan.is_empty() {
            return;
        }
        self.run_plan(&plan);
    }

    /// Admits waiting requests while budget, batch room and blocks allow (none when
    /// `blocked`: a running sequence lacked blocks), adding their first chunks to `plan`.
    fn admit(&mut self, plan: &mut Vec<(usize, usize)>, budget: &mut usize, blocked: bool) {
        // Admit waiting requests while budget, batch room and blocks allow. A request whose
        // prefix a running sequence is still prefilling waits for those blocks to seal rather
        // than compute the same KV beside it (it keeps its place; those behind it go ahead).
        let mut held = Vec::new();
        while *budget > 0 && self.running.len() < self.cfg.max_running && !blocked {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            // Disk blocks of the prefix are read and verified first, so a promotion can
            // never bring in a bad copy; then the prefix is taken, promoting what the cost
            // model says is faster to fetch than to recompute.
            let limit = s.tokens.len();
            let hashes = s.table.prefix_hashes(&s.tokens, limit);
            let places = self.mgr.locate_prefix(&hashes);
            if being_computed(&self.running, &hashes, places.len()) {
                if !s.waited {
                    s.waited = true;
                    self.stats.prefix_waits += 1;
                }
                held.push(s);
                continue;
            }
            self.tiers.stage(&mut self.mgr, &hashes, &places);
            let tiers = &self.tiers;
            let mut cached =
                s.table
                    .adopt_prefix_with(&mut self.mgr, &s.tokens, limit, &mut |p, h| {
                        tiers.fetch(p, h)
                    });
            // Every token's KV was cached (a block-aligned prompt seen before): the last token
            // still runs, for its logits, in a private copy of its block; just that one token,
            // as an engine with a token-exact cache would. Without a free block for the copy,
            // the whole last block is recomputed instead.
            let mut copy = None;
            if cached == s.tokens.len() {
                match s.table.unshare_last(&mut self.mgr) {
                    Ok(pair) => copy = Some(pair),
                    Err(_) => s.table.drop_last(&mut self.mgr),
                }
                cached = s.table.computed();
            }
            // Chunks of this prompt that end in reused blocks are resident through them.
            s.chunks_mapped = 0;
            let adopted: Vec<(usize, u64)> = s.table.hashes().iter().copied().enumerate().collect();
            map_chunks(&mut self.mgr, &mut s, &adopted, self.cfg.block_tokens);
            let take = s.pending().min(*budget);
            if s.table.reserve(&mut self.mgr, cached + take).is_err() {
                if let Some((shared, _)) = copy {
                    self.mgr.release(&[shared]);
                }
                s.table.release(&mut self.mgr);
                self.waiting.push_front(s);
                break;
            }
            self.copies.extend(copy);
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            if !s.started {
                s.started = true;
                self.stats.prompt_tokens += s.prompt_len as u64;
                self.stats.cached_prompt_tokens += cached as u64;
                s.send(Event::Started {
                    cached_tokens: cached,
                });
            }
            s.admitted_hashes = hashes;
            plan.push((self.running.len(), take));
            self.running.push(s);
            *budget -= take;
        }
        for s in held.into_iter().rev() {
            self.waiting.push_front(s);
        }
        // Requests still waiting get their disk blocks read ahead, in the background.
        for s in self.waiting.iter_mut().take(4) {
            if !s.prefetched {
                s.prefetched = true;
                let hashes = s.table.prefix_hashes(&s.tokens, s.tokens.len());
                let places = self.mgr.locate_prefix(&hashes);
                self.tiers.prefetch(&hashes, &places);
            }
        }
    }

    /// Copies the blocks this step's planning moved between tiers and the private copies
    /// of shared last blocks, before the forward pass writes into any of them.
    fn prepare_blocks(&mut self) {
        // Demotions (from allocations) and promotions (from admissions) are copied before
        // the forward pass writes into any reused block.
        let moves = self.mgr.take_moves();
        if !moves.is_empty() {
            self.tiers.apply(&mut self.pool, moves);
            self.tiers.trim_staged(&self.mgr);
        }
        // Then the private copies of shared last blocks (a block promoted this step has its
        // bytes by now).
        for (shared, fresh) in std::mem::take(&mut self.copies) {
            self.pool.copy_block(shared, fresh);
            self.mgr.release(&[shared]);
        }
    }

    fn preempt_last(&mut self) {
        if let Some(mut s) = self.running.pop() {
            // Its sealed blocks stay cached: re-admission adopts them.
            s.cached_hint = s.table.computed() / self.cfg.block_tokens * self.cfg.block_tokens;
            s.table.release(&mut self.mgr);
            self.stats.preemptions += 1;
            self.waiting_count.fetch_add(1, Ordering::SeqCst);
            self.waiting.push_front(s);
        }
    }

    fn run_plan(&mut self, plan: &[(usize, usize)]) {
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|&(i, take)| {
                let s = &self.running[i];
                let start = s.table.computed();
                SeqInput {
                    tokens: &s.tokens[start..start + take],
                    start,
                    blocks: s.table.ids(),
                    all_logits: s.req.logits.is_some(),
                }
            })
            .collect();
        let started = Instant::now();
        let result = self.model.forward(&inputs, &mut self.pool);
        let secs = started.elapsed().as_secs_f64();
        let prefill: usize = plan.iter().map(|&(_, t)| t).filter(|&t| t > 1).sum();
        if prefill >= 32 {
            let total: usize = plan.iter().map(|&(_, t)| t).sum();
            self.tiers.cost.record_prefill(total, secs);
        }
        self.stats.steps += 1;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let mut idx: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let mut s = self.running.remove(i);
                    s.table.release(&mut self.mgr);
                    s.send(Event::Failed(format!("model error: {e}")));
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (&(i, take), rows) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            let done = s.table.computed() + take;
            match s.table.commit(&mut self.mgr, &s.tokens, done) {
                Ok(sealed) => map_chunks(&mut self.mgr, s, &sealed, self.cfg.block_tokens),
                Err(e) => {
                    s.send(Event::Failed(format!("kv: {e}")));
                    finished.push(i);
                    continue;
                }
            }
            if let Some(tx) = &s.req.logits
                && let Ok(rows) = rows.to_vec2::<f32>()
            {
                for r in rows {
                    let _ = tx.send(r);
                }
            }
            if s.pending() > 0 {
                continue; // prefill not finished: its logits are not for a new token
            }
            let last = match rows
                .get(rows.dim(0).unwrap_or(1).saturating_sub(1))
                .and_then(|r| r.to_vec1::<f32>())
            {
                Ok(v) => v,
                Err(e) => {
                    s.send(Event::Failed(format!("logits: {e}")));
                    finished.push(i);
                    continue;
                }
            };
            let tok = sample(&last, &s.req.params, &mut s.rng);
            self.stats.generated_tokens += 1;
            let is_stop = !s.req.params.ignore_eos && self.stop.contains(&tok);
            if is_stop {
                s.send(Event::Finished(FinishReason::Stop));
                finished.push(i);
                continue;
            }
            s.tokens.push(tok);
            s.send(Event::Token(tok));
            if s.generated() >= s.req.params.max_tokens
                || s.tokens.len() >= self.model.config().context_length
            {
                s.send(Event::Finished(FinishReason::Length));
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        finished.dedup();
        for i in finished {
            let mut s = self.running.remove(i);
            s.table.release(&mut self.mgr);
        }
    }

    /// Refreshes the shared status and sends state updates to subscribers.
    fn publish(&mut self, force_load: bool) {
        let events = self.mgr.take_events();
        if !events.is_empty() {
            // Net change per tier (a block demoted and promoted back within one step is no
            // change), in first-seen order.
            let mut net: Vec<(Tier, u64, i32)> = Vec::new();
            let mut at: std::collections::HashMap<(Tier, u64), usize> = Default::default();
            let mut cleared = false;
            for e in events {
                let (tier, chunk, d) = match e {
                    ResidencyEvent::Added { chunk, tier } => (tier, chunk, 1),
                    ResidencyEvent::Removed { chunk, tier } => (tier, chunk, -1),
                    ResidencyEvent::Cleared => {
                        cleared = true;
                        continue;
                    }
                };
                match at.get(&(tier, chunk)) {
                    Some(&i) => net[i].2 += d,
                    None => {
                        at.insert((tier, chunk), net.len());
                        net.push((tier, chunk, d));
                    }
                }
            }
            for tier in Tier::ALL {
                let added: Vec<u64> = net
                    .iter()
                    .filter(|&&(t, _, d)| t == tier && d > 0)
                    .map(|&(_, c, _)| c)
                    .collect();
                let removed: Vec<u64> = net
                    .iter()
                    .filter(|&&(t, _, d)| t == tier && d < 0)
                    .map(|&(_, c, _)| c)
                    .collect();
                if !added.is_empty() || !removed.is_empty() {
                    self.seq += 1;
                    self.broadcast(StateUpdate::Delta {
                        seq: self.seq,
                        tier,
                        added,
                        removed,
                    });
                }
            }
            if cleared && self.mgr.chunk_map().is_empty() {
                self.seq += 1;
                self.broadcast(StateUpdate::Cleared { seq: self.seq });
            }
        }
        let cache = self.mgr.stats();
        let tiers: Vec<TierLoad> = Tier::ALL
            .into_iter()
            .filter(|&t| t == Tier::Device || self.mgr.capacity(t) > 0)
            .map(|tier| {
                let c = self.mgr.tier_counters(tier);
                TierLoad {
                    tier,
                    used_blocks: c.used_blocks,
                    capacity_blocks: c.capacity_blocks,
                }
            })
            .collect();
        let load = LoadReport {
            waiting: self.waiting.len() as u32,
            running: self.running.len() as u32,
            queued_prefill_tokens: self
                .waiting
                .iter()
                .chain(self.running.iter())
                .map(|s| s.queued_prefill() as u64)
                .sum(),
            used_blocks: (cache.in_use + cache.cached) as u64,
            capacity_blocks: cache.num_blocks as u64,
            tiers,
        };
        let due = match &self.last_load {
            None => true,
            Some((prev, at)) => {
                *prev != load && (force_load || at.elapsed() >= Duration::from_millis(50))
            }
        };
        if due {
            self.last_load = Some((load.clone(), Instant::now()));
            self.broadcast(StateUpdate::Load(load.clone()));
        }
        if self.resident_seq != self.seq {
            self.resident_seq = self.seq;
            for (i, t) in Tier::ALL.into_iter().enumerate() {
                self.resident[i] = self.mgr.resident_chunks(t);
            }
        }
        self.tiers.update_disk_status();
        let tier_status: Vec<TierStatus> = Tier::ALL
            .into_iter()
            .enumerate()
            .map(|(i, tier)| TierStatus {
                tier,
                enabled: tier == Tier::Device || self.mgr.capacity(tier) > 0,
                counters: self.mgr.tier_counters(tier),
                bytes: self.tiers.bytes[i],
                cost: self.tiers.cost.report(tier),
                resident_chunks: self.resident[i].clone(),
            })
            .collect();
        let cost = CostStatus {
            policy: self.tiers.cost.policy,
            recompute_tokens_per_s: self.tiers.cost.prefill_tps.get(),
            block_bytes: self.tiers.block_bytes(),
        };
        let mut st = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        *st = Status {
            load,
            cache,
            residency_seq: self.seq,
            resident_chunks: self.resident[0].clone(),
            block_tokens: st.block_tokens,
            pool_bytes: st.pool_bytes,
            pool_bytes_per_token: st.pool_bytes_per_token,
            tiers: tier_status,
            cost,
            disk: self.tiers.disk_status.clone(),
            ..self.stats.clone()
        };
    }

    fn broadcast(&mut self, u: StateUpdate) {
        self.subscribers.retain(|tx| tx.send(u.clone()).is_ok());
    }
}

/// Whether a running sequence's prefill will seal blocks of `hashes` beyond the first `cached`
/// (those already cached in some tier): the leading blocks the two share that are not cached
/// yet are ones it is computing.
fn being_computed(running: &[Seq], hashes: &[BlockHash], cached: usize) -> bool {
    running.iter().any(|r| {
        let shared = r
            .admitted_hashes
            .iter()
            .zip(hashes)
            .take_while(|(a, b)| a == b)
            .count();
        shared > cached
    })
}

/// Maps the sequence's text chunks that end inside the newly sealed (or reused) blocks
/// `sealed` (`(block index, hash)`, ascending) to those blocks.
fn map_chunks(mgr: &mut BlockManager, s: &mut Seq, sealed: &[(usize, u64)], block_tokens: usize) {
    for &(b, h) in sealed {
        let end = (b + 1) * block_tokens;
        let from = s.chunks_mapped;
        let n = s.req.chunks[from..]
            .iter()
            .take_while(|c| c.token < end)
            .count();
        let hashes: Vec<u64> = s.req.chunks[from..from + n]
            .iter()
            .map(|c| c.hash)
            .collect();
        mgr.map_chunks(h, &hashes);
        s.chunks_mapped += n;
    }
}
