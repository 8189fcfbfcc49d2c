//! Turns kvmesh endpoint resources into Deployments, Services and KEDA ScaledObjects, and
//! describes the gateway pools they form.
//!
//! - [`crd`]: the `InferenceEndpointConfig` and `CatalogModel` kinds (group `kvmesh.io`).
//! - [`checked`]: parses a spec once into a checked [`checked::Endpoint`].
//! - [`affinity`] and [`placement`]: instance-type node affinity and the `Ordered` fallback.
//! - [`render`]: pure rendering of every Kubernetes object (used by the controller and offline).
//! - [`reconcile`]: the kube-rs reconciler (server-side apply, finalizer, status, events).
//! - [`pools`]: pool descriptions for the xDS control plane.
//! - [`hyperpod`]: import of HyperPod Inference Operator resources.

pub mod affinity;
pub mod checked;
pub mod crd;
pub mod hyperpod;
pub mod offline;
pub mod placement;
pub mod pools;
pub mod reconcile;
pub mod render;
pub mod resource;
pub mod run;
