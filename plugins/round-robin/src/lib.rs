//! The round-robin strategy as an Envoy filter: the cache-agnostic baseline.

use kvmesh_plugins_sdk::policy::RoundRobin;

kvmesh_plugins_filter::export_strategy!(|params| {
    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Params {
        max_fallbacks: Option<usize>,
    }
    let p: Params = kvmesh_plugins_sdk::policy::parse_params("round-robin", params)?;
    Ok(RoundRobin::default().with_max_fallbacks(p.max_fallbacks.unwrap_or(2)))
});
