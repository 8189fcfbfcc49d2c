//! The prefix-aware strategy as an Envoy filter: learned prefix affinity with
//! bounded load, no state from the servers needed.

use kvmesh_plugins_sdk::policy::{PrefixAware, parse_params};

kvmesh_plugins_filter::export_strategy!(|params| PrefixAware::new(parse_params(
    "prefix-aware",
    params
)?));
