//! The kvmesh state pump: a bootstrap wasm service (`envoy.bootstrap.wasm`,
//! singleton, `vm_id` shared with the routing filters) that subscribes to the
//! control plane's live state by delta xDS (`kvmesh.v1.PoolState`,
//! `kvmesh.v1.ResidencyShard`), ACKs or NACKs each response, and writes the
//! SDK's shared-data layout (head, snapshot, delta ring per pool) at most every
//! `flush_ms`. The protocol and coalescing logic is plain Rust, tested
//! natively; only `wasm.rs` touches the proxy-wasm ABI.

pub mod client;
pub mod discovery;
pub mod pump;

#[cfg(target_arch = "wasm32")]
mod wasm;
