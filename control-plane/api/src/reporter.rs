//! [`Reporter`]: keeps one `ReplicaState.Report` stream open for a replica.
//!
//! The caller reports load and residency changes through cheap, non-blocking
//! methods; a background task owns the stream. The reporter mirrors what it
//! was told is resident, so it can answer a resync request (or a reconnect)
//! with a full snapshot without asking the model server. Sequence numbers
//! restart at 1 on every stream: the snapshot sent after `Register` carries 1,
//! and each later residency message (delta, snapshot, cleared) one more.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kvmesh_plugins_sdk::proto::{
    AllCleared, ControlMessage, Load, Register, ReplicaReport, ResidencyDelta, ResidencySnapshot,
    Tier, TierChunks, control_message, replica_report,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::grpc::replica_state_client::ReplicaStateClient;

/// Reconnect delays: exponential from `min` to `max`. The control plane's `warmup_ms` after a
/// restart must exceed `max` (plus a registration), or it publishes a pool before its replicas
/// are back and Envoy loses them for a moment: the default cap of 1 s sits under the default
/// warm-up of 2 s.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(50),
            max: Duration::from_secs(1),
        }
    }
}

/// What the reporter needs to know up front.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Control plane state endpoint, e.g. `http://127.0.0.1:18000`.
    pub endpoint: String,
    /// Sent first on every stream.
    pub register: Register,
    pub backoff: Backoff,
    /// Outgoing reports buffered per stream before the writer waits.
    pub stream_buffer: usize,
    /// The current load is re-sent this often even when unchanged, so the
    /// control plane can tell a quiet replica from a dead one.
    pub heartbeat: Duration,
}

impl ReporterConfig {
    pub fn new(endpoint: impl Into<String>, register: Register) -> Self {
        Self {
            endpoint: endpoint.into(),
            register,
            backoff: Backoff::default(),
            stream_buffer: 256,
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Where the reporter's stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected (yet, or again); `attempts` counts failed tries since the
    /// last registration.
    Connecting { attempts: u32 },
    /// The control plane confirmed the registration; `streams` counts the
    /// streams registered so far (so a test can see a reconnect happened).
    Registered { streams: u64 },
    /// The reporter was dropped.
    Closed,
}

/// Everything a replica holds, per tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    tiers: BTreeMap<i32, HashSet<u64>>,
}

impl Residency {
    /// Applies a change: `removed` first, then `added`.
    pub fn apply(&mut self, added: &[TierChunks], removed: &[TierChunks]) {
        for r in removed {
            if let Some(set) = self.tiers.get_mut(&r.tier) {
                for c in &r.chunks {
                    set.remove(c);
                }
            }
        }
        for a in added {
            self.tiers
                .entry(a.tier)
                .or_default()
                .extend(a.chunks.iter().copied());
        }
        self.tiers.retain(|_, s| !s.is_empty());
    }

    pub fn clear(&mut self) {
        self.tiers.clear();
    }

    /// Number of (tier, chunk) pairs held.
    pub fn len(&self) -> usize {
        self.tiers.values().map(HashSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    pub fn contains(&self, tier: Tier, chunk: u64) -> bool {
        self.tiers
            .get(&(tier as i32))
            .is_some_and(|s| s.contains(&chunk))
    }

    /// The proto form, one `TierChunks` per tier, chunks sorted.
    pub fn to_tier_chunks(&self) -> Vec<TierChunks> {
        self.tiers
            .iter()
            .map(|(tier, set)| {
                let mut chunks: Vec<u64> = set.iter().copied().collect();
                chunks.sort_unstable();
                TierChunks {
                    tier: *tier,
                    chunks,
                }
            })
            .collect()
    }
}

enum Command {
    Residency {
        added: Vec<TierChunks>,
        removed: Vec<TierChunks>,
    },
    Cleared,
}

/// Handle to the background task that streams one replica's state. Dropping
/// it closes the stream.
#[derive(Debug)]
pub struct Reporter {
    commands: mpsc::UnboundedSender<Command>,
    load: watch::Sender<Load>,
    state: watch::Receiver<ConnState>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Residency { added, removed } => f
                .debug_struct("Residency")
                .field("added", &added.len())
                .field("removed", &removed.len())
                .finish(),
            Command::Cleared => f.write_str("Cleared"),
        }
    }
}

impl Reporter {
    /// Starts the background task on the current tokio runtime. It connects,
    /// registers and keeps reconnecting (with backoff, then a full resync)
    /// until the reporter is dropped.
    pub fn spawn(config: ReporterConfig) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (load, load_rx) = watch::channel(Load::default());
        let (state_tx, state) = watch::channel(ConnState::Connecting { attempts: 0 });
        let task = tokio::spawn(run(config, rx, load_rx, state_tx));
        Self {
            commands,
            load,
            state,
            task,
        }
    }

    /// Sets the current load; only the latest value is sent, once per change.
    pub fn load(&self, load: Load) {
        self.load.send_if_modified(|cur| {
            if *cur == load {
                false
            } else {
                *cur = load;
                true
            }
        });
    }

    /// Reports chunks that entered (`added`) or left (`removed`) tiers.
    pub fn residency(&self, added: Vec<TierChunks>, removed: Vec<TierChunks>) {
        if added.iter().chain(&removed).all(|t| t.chunks.is_empty()) {
            return;
        }
        // The task only ends when `self` is dropped, so the send cannot fail
        // while we are alive; ignore the impossible error.
        let _ = self.commands.send(Command::Residency { added, removed });
    }

    /// Reports that the replica dropped its whole cache.
    pub fn cleared(&self) {
        let _ = self.commands.send(Command::Cleared);
    }

    /// The stream's state, to watch (e.g. `wait_for(|s| matches!(s, Registered{..}))`).
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Session<'a> {
    out: mpsc::Sender<ReplicaReport>,
    seq: &'a mut u64,
}

impl Session<'_> {
    async fn send(&mut self, event: replica_report::Event) -> bool {
        self.out
            .send(ReplicaReport { event: Some(event) })
            .await
            .is_ok()
    }

    fn next_seq(&mut self) -> u64 {
        *self.seq += 1;
        *self.seq
    }

    async fn snapshot(&mut self, mirror: &Residency) -> bool {
        let seq = self.next_seq();
        self.send(replica_report::Event::Snapshot(ResidencySnapshot {
            seq,
            resident: mirror.to_tier_chunks(),
        }))
        .await
    }
}

async fn run(
    config: ReporterConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut load: watch::Receiver<Load>,
    state: watch::Sender<ConnState>,
) {
    let mut mirror = Residency::default();
    let mut attempts: u32 = 0;
    let mut streams: u64 = 0;
    loop {
        match stream_once(
            &config,
            &mut commands,
            &mut load,
            &mut mirror,
            &state,
            &mut streams,
        )
        .await
        {
            StreamEnd::Closed => {
                let _ = state.send(ConnState::Closed);
                return;
            }
            StreamEnd::Lost { registered } => {
                if registered {
                    attempts = 0;
                }
                attempts = attempts.saturating_add(1);
                let _ = state.send(ConnState::Connecting { attempts });
            }
        }
        let delay = backoff_delay(config.backoff, attempts);
        // Keep the mirror current while we wait, so the resync is complete.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => apply(&mut mirror, cmd),
                    None => {
                        let _ = state.send(ConnState::Closed);
                        return;
                    }
                },
            }
        }
    }
}

fn backoff_delay(backoff: Backoff, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    backoff.min.saturating_mul(1u32 << exp).min(backoff.max)
}

fn apply(mirror: &mut Residency, cmd: Command) {
    match cmd {
        Command::Residency { added, removed } => mirror.apply(&added, &removed),
        Command::Cleared => mirror.clear(),
    }
}

enum StreamEnd {
    Closed,
    Lost { registered: bool },
}

async fn stream_once(
    config: &ReporterConfig,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    load: &mut watch::Receiver<Load>,
    mirror: &mut Residency,
    state: &watch::Sender<ConnState>,
    streams: &mut u64,
) -> StreamEnd {
    let lost = StreamEnd::Lost { registered: false };
    let endpoint = match Endpoint::from_shared(config.endpoint.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true),
        Err(e) => {
            tracing::error!(endpoint = %config.endpoint, error = %e, "bad control plane endpoint");
            return lost;
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(endpoint = %config.endpoint, error = %e, "connect failed");
            return lost;
        }
    };
    let mut client = ReplicaStateClient::new(channel);
    let (out, out_rx) = mpsc::channel(config.stream_buffer.max(1));
    let mut seq = 0u64;
    let mut session = Session { out, seq: &mut seq };
    // Queue registration, the full snapshot and the current load before the
    // call starts, so they are the first messages the control plane sees.
    let _ = session
        .send(replica_report::Event::Register(config.register.clone()))
        .await;
    // Fold in whatever arrived while disconnected before snapshotting.
    while let Ok(cmd) = commands.try_recv() {
        apply(mirror, cmd);
    }
    let _ = session.snapshot(mirror).await;
    let current = load.borrow_and_update().clone();
    let _ = session.send(replica_report::Event::Load(current)).await;

    let mut inbound = match client.report(ReceiverStream::new(out_rx)).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            tracing::debug!(%status, "report call failed");
            return lost;
        }
    };
    let mut registered = false;
    let mut heartbeat = tokio::time::interval(config.heartbeat.max(Duration::from_millis(10)));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let current = load.borrow().clone();
                if !session.send(replica_report::Event::Load(current)).await {
                    return StreamEnd::Lost { registered };
                }
            }
            msg = inbound.next() => match msg {
                Some(Ok(ControlMessage { msg: Some(m) })) => match m {
                    control_message::Msg::Registered(_) => {
                        registered = true;
                        *streams += 1;
                        let _ = state.send(ConnState::Registered { streams: *streams });
                    }
                    control_message::Msg::Resync(r) => {
                        tracing::info!(reason = %r.reason, "control plane asked for a resync");
                        if !session.snapshot(mirror).await {
                            return StreamEnd::Lost { registered };
                        }
                    }
                    control_message::Msg::Rejected(r) => {
                        tracing::warn!(reason = %r.reason, "control plane rejected a report");
                    }
                },
                Some(Ok(ControlMessage { msg: None })) => {}
                Some(Err(status)) => {
                    tracing::debug!(%status, "state stream failed");
                    return StreamEnd::Lost { registered };
                }
                None => return StreamEnd::Lost { registered },
            },
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return StreamEnd::Closed };
                let event = match &cmd {
                    Command::Residency { added, removed } => {
                        let seq = session.next_seq();
                        replica_report::Event::Delta(ResidencyDelta {
                            seq,
                            added: added.clone(),
                            removed: removed.clone(),
                        })
                    }
                    Command::Cleared => replica_report::Event::Cleared(AllCleared { seq: session.next_seq() }),
                };
                apply(mirror, cmd);
                if !session.send(event).await {
                    return StreamEnd::Lost { registered };
                }
            }
            changed = load.changed() => {
                if changed.is_err() {
                    return StreamEnd::Closed;
                }
                let current = load.borrow_and_update().clone();
                if !session.send(replica_report::Event::Load(current)).await {
                    return StreamEnd::Lost { registered };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tc(tier: Tier, chunks: &[u64]) -> TierChunks {
        TierChunks {
            tier: tier as i32,
            chunks: chunks.to_vec(),
        }
    }

    #[test]
    fn residency_applies_removed_before_added() {
        let mut r = Residency::default();
        r.apply(&[tc(Tier::Device, &[1, 2, 3])], &[]);
        r.apply(&[tc(Tier::Host, &[2])], &[tc(Tier::Device, &[2])]);
        assert!(r.contains(Tier::Device, 1));
        assert!(!r.contains(Tier::Device, 2));
        assert!(r.contains(Tier::Host, 2));
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.to_tier_chunks(),
            vec![tc(Tier::Device, &[1, 3]), tc(Tier::Host, &[2])]
        );
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn backoff_grows_then_caps() {
        let b = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        assert_eq!(backoff_delay(b, 1), Duration::from_millis(10));
        assert_eq!(backoff_delay(b, 2), Duration::from_millis(20));
        assert_eq!(backoff_delay(b, 4), Duration::from_millis(80));
        assert_eq!(backoff_delay(b, 5), Duration::from_millis(100));
        assert_eq!(backoff_delay(b, 1000), Duration::from_millis(100));
    }
}
