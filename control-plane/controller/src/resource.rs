//! What the reconciler needs from either endpoint kind.

use std::fmt::Debug;

use kube::Resource;
use kube::core::NamespaceResourceScope;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::catalog::{CatalogEntry, CatalogModel, DEFAULT_CATALOG};
use crate::crd::endpoint::{InferenceEndpointConfig, InferenceEndpointConfigSpec};
use crate::crd::status::EndpointStatus;

/// An endpoint kind: `InferenceEndpointConfig` or `CatalogModel`.
pub trait EndpointResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Kind name, also the value of the `kvmesh.io/endpoint-kind` label.
    const KIND_NAME: &'static str;
    /// The current status, if any.
    fn endpoint_status(&self) -> Option<&EndpointStatus>;
    /// The catalog ConfigMap and model id to resolve, for catalog kinds.
    fn catalog_ref(&self) -> Option<(String, String)>;
    /// The endpoint spec, from the resource alone or merged with its catalog entry.
    fn endpoint_spec(&self, entry: Option<&CatalogEntry>) -> Option<InferenceEndpointConfigSpec>;
}

impl EndpointResource for InferenceEndpointConfig {
    const KIND_NAME: &'static str = "InferenceEndpointConfig";

    fn endpoint_status(&self) -> Option<&EndpointStatus> {
        self.status.as_ref()
    }

    fn catalog_ref(&self) -> Option<(String, String)> {
        None
    }

    fn endpoint_spec(&self, _entry: Option<&CatalogEntry>) -> Option<InferenceEndpointConfigSpec> {
        Some(self.spec.clone())
    }
}

impl EndpointResource for CatalogModel {
    const KIND_NAME: &'static str = "CatalogModel";

    fn endpoint_status(&self) -> Option<&EndpointStatus> {
        self.status.as_ref()
    }

    fn catalog_ref(&self) -> Option<(String, String)> {
        Some((
            self.spec
                .catalog
                .clone()
                .unwrap_or_else(|| DEFAULT_CATALOG.to_owned()),
            self.spec.model_id.clone(),
        ))
    }

    fn endpoint_spec(&self, entry: Option<&CatalogEntry>) -> Option<InferenceEndpointConfigSpec> {
        entry.map(|e| crate::checked::resolve_catalog(&self.spec, e))
    }
}
