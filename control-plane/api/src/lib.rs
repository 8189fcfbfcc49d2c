//! The model server -> control plane boundary: the `kvmesh.v1.ReplicaState`
//! gRPC service (tonic client and server stubs over the SDK's message types)
//! and [`Reporter`], the client library a model server (or a fake replica)
//! uses to keep one registered, resyncable state stream open.

mod reporter;

/// Generated tonic stubs: `replica_state_client::ReplicaStateClient` and
/// `replica_state_server::{ReplicaState, ReplicaStateServer}`. The messages
/// they carry are [`kvmesh_plugins_sdk::proto`]'s.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod grpc {
    tonic::include_proto!("kvmesh.v1");
}

pub use kvmesh_plugins_sdk::proto;
pub use reporter::{Backoff, ConnState, Reporter, ReporterConfig, Residency};
