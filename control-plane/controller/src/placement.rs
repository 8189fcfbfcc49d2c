//! The `Ordered` instance-type fallback as a pure state machine.
//!
//! An `Ordered` endpoint starts pinned to its first instance type. Each time its pods have been
//! Unschedulable for the whole fallback delay at the current width, the next type is allowed
//! (the required node affinity widens; earlier types keep the higher preferred weights, so the
//! scheduler still favours them). Every step is recorded in `status.placement`. The placement
//! never narrows again on its own: shrinking would evict running replicas; editing the list
//! resets it.

use std::time::Duration;

use jiff::Timestamp;

use crate::checked::Placement;
use crate::crd::endpoint::SchedulingMode;
use crate::crd::status::{PlacementStatus, PlacementStep};

/// What the controller should do after one placement step.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The placement to record in status (and to render the affinity from).
    pub status: PlacementStatus,
    /// Come back after this long to re-check (a fallback delay is running).
    pub recheck_after: Option<Duration>,
    /// The type added by this step, if it widened.
    pub widened: Option<String>,
}

/// Advances the placement given how many pods are Unschedulable now.
pub fn advance(
    plan: &Placement,
    previous: Option<&PlacementStatus>,
    unschedulable_pods: usize,
    now: Timestamp,
) -> Outcome {
    let (types, mode, delay) = match plan {
        Placement::NodeAffinity => {
            return Outcome {
                status: PlacementStatus {
                    mode: "NodeAffinity".into(),
                    ..Default::default()
                },
                recheck_after: None,
                widened: None,
            };
        }
        Placement::InstanceTypes {
            types,
            mode,
            fallback_delay,
        } => (types, *mode, *fallback_delay),
    };
    if mode == SchedulingMode::Preferred {
        return Outcome {
            status: PlacementStatus {
                mode: "Preferred".into(),
                allowed_instance_types: types.clone(),
                ..Default::default()
            },
            recheck_after: None,
            widened: None,
        };
    }

    // Continue from the recorded width when it is still a prefix of the list; else start over.
    let mut status = match previous {
        Some(p)
            if p.mode == "Ordered"
                && !p.allowed_instance_types.is_empty()
                && types.starts_with(&p.allowed_instance_types) =>
        {
            p.clone()
        }
        _ => PlacementStatus {
            mode: "Ordered".into(),
            allowed_instance_types: vec![types[0].clone()],
            ..Default::default()
        },
    };

    if unschedulable_pods == 0 {
        status.unschedulable_since = None;
        return Outcome {
            status,
            recheck_after: None,
            widened: None,
        };
    }
    let since = status
        .unschedulable_since
        .as_deref()
        .and_then(|s| s.parse::<Timestamp>().ok())
        .filter(|s| *s <= now)
        .unwrap_or(now);
    let waited = Duration::try_from(now.duration_since(since)).unwrap_or_default();
    let width = status.allowed_instance_types.len();
    if width >= types.len() {
        // Nothing left to widen to; keep the clock for the record.
        status.unschedulable_since = Some(since.to_string());
        return Outcome {
            status,
            recheck_after: None,
            widened: None,
        };
    }
    if waited < delay {
        status.unschedulable_since = Some(since.to_string());
        return Outcome {
            status,
            recheck_after: Some(delay - waited),
            widened: None,
        };
    }
    let added = types[width].clone();
    status.allowed_instance_types.push(added.clone());
    status.steps.push(PlacementStep {
        at: now.to_string(),
        added: added.clone(),
        reason: format!(
            "{unschedulable_pods} pod(s) Unschedulable for {}s on {}",
            waited.as_secs(),
            types[..width].join(",")
        ),
    });
    // The clock restarts at the new width: its pods get the full delay too (a pass that finds
    // them scheduled clears it).
    status.unschedulable_since = Some(now.to_string());
    Outcome {
        status,
        recheck_after: Some(delay),
        widened: Some(added),
    }
}
