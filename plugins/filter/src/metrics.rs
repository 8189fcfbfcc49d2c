//! Envoy metrics the filter defines (`wasmcustom.kvmesh.<strategy>.*` in
//! Envoy's stats).

use kvmesh_plugins_sdk::policy::Reason;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

const REASONS: [Reason; 9] = [
    Reason::NoReplicas,
    Reason::NoPrompt,
    Reason::Rotation,
    Reason::Affinity,
    Reason::Hash,
    Reason::Placed,
    Reason::Spilled,
    Reason::Resident,
    Reason::Load,
];

/// Why the body was not used for routing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unparsed {
    Malformed,
    NoModel,
    NoPrompt,
    TooLarge,
    NotAnApi,
}

const UNPARSED: [(&str, Unparsed); 5] = [
    ("malformed", Unparsed::Malformed),
    ("no_model", Unparsed::NoModel),
    ("no_prompt", Unparsed::NoPrompt),
    ("too_large", Unparsed::TooLarge),
    ("other_path", Unparsed::NotAnApi),
];

/// Metric ids; a metric that could not be defined is `None` and not recorded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    decisions: Option<u32>,
    by_reason: [Option<u32>; REASONS.len()],
    matched_chunks: Option<u32>,
    fallback_used: Option<u32>,
    parse_failures: Option<u32>,
    by_unparsed: [Option<u32>; 5],
    state_reloads: Option<u32>,
    state_errors: Option<u32>,
    board_shared: Option<u32>,
    board_conflicts: Option<u32>,
    decision_us: Option<u32>,
}

fn define(kind: MetricType, name: String) -> Option<u32> {
    match hostcalls::define_metric(kind, &name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("kvmesh: cannot define metric {name}: {status:?}");
            None
        }
    }
}

fn inc(id: Option<u32>, by: i64) {
    if let Some(id) = id {
        // A failed metric update must not affect routing.
        let _ = hostcalls::increment_metric(id, by);
    }
}

impl Metrics {
    pub(crate) fn define(strategy: &str) -> Self {
        let c = |suffix: &str| define(MetricType::Counter, format!("kvmesh.{strategy}.{suffix}"));
        Metrics {
            decisions: c("decisions"),
            by_reason: REASONS.map(|r| c(&format!("decisions.{}", r.label()))),
            matched_chunks: c("matched_chunks"),
            fallback_used: c("fallback_used"),
            parse_failures: c("parse_failures"),
            by_unparsed: UNPARSED.map(|(label, _)| c(&format!("parse_failures.{label}"))),
            state_reloads: c("state_reloads"),
            state_errors: c("state_errors"),
            board_shared: c("board.shared"),
            board_conflicts: c("board.conflicts"),
            decision_us: define(
                MetricType::Histogram,
                format!("kvmesh.{strategy}.decision_us"),
            ),
        }
    }

    pub(crate) fn decision(&self, reason: Reason, matched_chunks: u32) {
        inc(self.decisions, 1);
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            inc(self.by_reason[i], 1);
        }
        inc(self.matched_chunks, i64::from(matched_chunks));
    }

    /// Counts a request routed without a prompt. Requests to other paths
    /// (`/health`, `/v1/models`) are expected and not parse failures.
    pub(crate) fn unparsed(&self, why: Unparsed) {
        if !matches!(why, Unparsed::NotAnApi) {
            inc(self.parse_failures, 1);
        }
        if let Some(i) = UNPARSED
            .iter()
            .position(|(_, u)| std::mem::discriminant(u) == std::mem::discriminant(&why))
        {
            inc(self.by_unparsed[i], 1);
        }
    }

    pub(crate) fn fallback_used(&self) {
        inc(self.fallback_used, 1);
    }

    pub(crate) fn state_reload(&self) {
        inc(self.state_reloads, 1);
    }

    pub(crate) fn state_error(&self) {
        inc(self.state_errors, 1);
    }

    /// A placement of another VM read from the board.
    pub(crate) fn board_shared(&self) {
        inc(self.board_shared, 1);
    }

    /// A board write lost to another VM's (the decision is made again).
    pub(crate) fn board_conflict(&self) {
        inc(self.board_conflicts, 1);
    }

    pub(crate) fn decision_time(&self, micros: u64) {
        if let Some(id) = self.decision_us {
            let _ = hostcalls::record_metric(id, micros);
        }
    }
}
