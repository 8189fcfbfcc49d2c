//! A diagnostic HTTP filter: `GET /kvmesh/state/<pool>` is answered by the
//! filter itself with the state this worker's VM sees in shared data (read
//! with the SDK's `StateReader`, exactly as a routing filter does), so tests
//! and benchmarks can tell when a change reached every worker. Other requests
//! pass through untouched. Each VM takes a distinct id from shared data (CAS)
//! and reports it, so a caller can tell workers apart.

#[cfg(target_arch = "wasm32")]
mod wasm;

/// The path prefix the probe answers.
pub const PREFIX: &str = "/kvmesh/state/";

/// The pool named by a probe path, if it is one.
pub fn pool_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(PREFIX)?;
    let pool = rest.split(['?', '/']).next()?;
    (!pool.is_empty()).then_some(pool)
}

/// The JSON body describing a worker's view.
pub fn describe(vm: u64, seq: u64, snapshot: &kvmesh_plugins_sdk::snapshot::Snapshot) -> String {
    let replicas: Vec<serde_json::Value> = snapshot
        .replicas()
        .map(|(_, r)| {
            serde_json::json!({
                "id": r.id,
                "address": r.address,
                "waiting": r.load.waiting,
                "queued_prefill_tokens": r.load.queued_prefill_tokens,
            })
        })
        .collect();
    serde_json::json!({
        "vm": vm,
        "seq": seq,
        "model": snapshot.model(),
        "replicas": replicas,
        "indexed_chunks": snapshot.indexed_chunks(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_paths() {
        assert_eq!(pool_of("/kvmesh/state/pool-a"), Some("pool-a"));
        assert_eq!(pool_of("/kvmesh/state/pool-a?x=1"), Some("pool-a"));
        assert_eq!(pool_of("/kvmesh/state/"), None);
        assert_eq!(pool_of("/v1/completions"), None);
    }
}
