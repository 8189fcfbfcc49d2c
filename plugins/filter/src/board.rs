//! The placement board ([`kvmesh_plugins_sdk::board`]) in Envoy shared data:
//! read before every decision of a strategy that shares placements, written
//! (compare-and-swap) when its policy shares the decision
//! ([`Policy::shares`]: a new prefix placed, or for prefix-aware also a
//! request mostly its own).

use kvmesh_plugins_sdk::board::{Board, Decision};
use kvmesh_plugins_sdk::policy::{Event, Policy};
use kvmesh_plugins_sdk::snapshot::Snapshot;
use kvmesh_plugins_sdk::state::board_key;
use proxy_wasm::hostcalls;

use crate::metrics::Metrics;

/// Decisions older than this are not fed to a policy: after a swap or a
/// restart the replicas' residency tells where old prefixes are.
const TTL_MS: u64 = 60_000;

/// One VM's view of the board: its key and the newest decision fed.
#[derive(Debug)]
pub(crate) struct BoardView {
    key: String,
    seen: u64,
}

/// The board as read, with its CAS token, ready for a push.
pub(crate) struct Read {
    board: Board,
    cas: Option<u32>,
}

impl BoardView {
    pub(crate) fn new(pool: &str) -> Self {
        Self {
            key: board_key(pool),
            seen: 0,
        }
    }

    /// Creates an empty board if there is none, so that every later write is
    /// a compare-and-swap (a write to an absent key cannot be one).
    pub(crate) fn ensure(&self) {
        if let Ok((None, _)) = hostcalls::get_shared_data(&self.key) {
            let _ = hostcalls::set_shared_data(&self.key, Some(&Board::default().encode()), None);
        }
    }

    /// Reads the board and feeds the decisions this VM has not seen to
    /// `policy`; an undecodable board reads as empty (the next push
    /// replaces it).
    pub(crate) fn read<P: Policy>(
        &mut self,
        policy: &mut P,
        snapshot: &Snapshot,
        now_ms: u64,
        metrics: &Metrics,
    ) -> Read {
        let (bytes, cas) = hostcalls::get_shared_data(&self.key).unwrap_or((None, None));
        let board = match bytes.as_deref().map(Board::decode) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                metrics.state_error();
                log::warn!("kvmesh: {e}");
                Board::default()
            }
            None => Board::default(),
        };
        if board.last_seq() < self.seen {
            // Rewritten from scratch: start over.
            self.seen = 0;
        }
        for entry in board.since(self.seen) {
            if now_ms.saturating_sub(entry.at_ms) > TTL_MS {
                continue;
            }
            let Some((replica, _)) = snapshot
                .replicas()
                .find(|(_, rep)| rep.key == entry.replica_key)
            else {
                continue;
            };
            metrics.board_shared();
            policy.observe(
                snapshot,
                &Event::Shared {
                    chunks: &entry.chunks,
                    total_chunks: entry.total_chunks,
                    own_chunks: entry.own_chunks,
                    placed: entry.placed,
                    replica,
                },
            );
        }
        self.seen = board.last_seq();
        Read { board, cas }
    }

    /// Appends a decision to what [`BoardView::read`] returned; false when
    /// another VM wrote the board in between (read again and decide again).
    pub(crate) fn push(&mut self, read: Read, decision: Decision<'_>) -> bool {
        let Read { mut board, cas } = read;
        let seq = board.push(decision);
        match hostcalls::set_shared_data(&self.key, Some(&board.encode()), cas) {
            Ok(()) => {
                self.seen = seq;
                true
            }
            Err(_) => false,
        }
    }
}
