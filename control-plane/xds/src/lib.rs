//! Serves Envoy (and the kvmesh state pump) by ADS: state-of-the-world and
//! delta xDS from a versioned snapshot per node, with nonces, ACK/NACK tracked
//! per node and resource, and resync after a reconnect. It knows nothing of
//! kvmesh's pools: callers build [`Snapshot`]s and set them in the
//! [`SnapshotCache`]; a node with no snapshot is served nothing, so Envoy
//! keeps its last good config until the caller's state is complete.

pub mod cache;
pub mod delta;
pub mod resource;
pub mod server;
pub mod sotw;
pub mod status;

pub use cache::SnapshotCache;
pub use resource::{LazyBody, Resource, Snapshot, TypeResources, type_url};
pub use server::{Observer, XdsServer};
pub use status::{Answer, Outcome, StatusTracker};
