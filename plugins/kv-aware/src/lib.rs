//! The kv-aware strategy as an Envoy filter: resident prefix per tier against
//! queued prefill, from the replicas' reported state.

use kvmesh_plugins_sdk::policy::{KvAware, parse_params};

kvmesh_plugins_filter::export_strategy!(|params| KvAware::new(parse_params("kv-aware", params)?));
