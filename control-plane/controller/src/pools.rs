//! Pool descriptions for the xDS control plane: one pool per endpoint resource, its strategy
//! from the resource, its members from the Service's EndpointSlices. Pure: the control plane
//! feeds it what its watches hold.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kvmesh_plugins_sdk::proto::PoolConfig;

use crate::checked::{Endpoint, find_catalog_entry, resolve_catalog, strategy_name};
use crate::crd::endpoint::InferenceEndpointConfigSpec;
use crate::crd::{CatalogModel, InferenceEndpointConfig};

pub use kvmesh_plugins_sdk::chunk::DEFAULT_CHUNK_BYTES;
/// Default number of fallback replicas listed after the primary.
pub const DEFAULT_MAX_FALLBACKS: u32 = 2;

/// One pool: its configuration and its ready members (`ip:port`, sorted).
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Namespace of the endpoint resource.
    pub namespace: String,
    /// Name of the endpoint resource.
    pub name: String,
    /// What the filters need to know about the pool.
    pub config: PoolConfig,
    /// Ready replica addresses.
    pub endpoints: Vec<String>,
}

/// An endpoint resource reduced to what a pool needs (either kind, after catalog resolution).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSource {
    /// Namespace.
    pub namespace: String,
    /// Name (also the Service name).
    pub name: String,
    /// The resolved spec.
    pub spec: InferenceEndpointConfigSpec,
}

impl PoolSource {
    /// From an `InferenceEndpointConfig` (`None` without a namespace or name).
    pub fn from_endpoint(r: &InferenceEndpointConfig) -> Option<Self> {
        Some(Self {
            namespace: r.metadata.namespace.clone()?,
            name: r.metadata.name.clone()?,
            spec: r.spec.clone(),
        })
    }

    /// From a `CatalogModel` and the data of its catalog ConfigMap (`None` when the entry is
    /// missing or malformed: that resource forms no pool until its catalog resolves).
    pub fn from_catalog(r: &CatalogModel, catalog_data: &BTreeMap<String, String>) -> Option<Self> {
        let entry = find_catalog_entry(catalog_data, &r.spec.model_id).ok()?;
        Some(Self {
            namespace: r.metadata.namespace.clone()?,
            name: r.metadata.name.clone()?,
            spec: resolve_catalog(&r.spec, &entry),
        })
    }
}

/// The pool name of an endpoint resource: `<namespace>.<name>`. Unambiguous (a namespace
/// has no '.'), and free of '/', which the control plane's resource names use as separator.
pub fn pool_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// The pool config of one endpoint; `None` for a spec that does not check.
pub fn pool_config(src: &PoolSource) -> Option<PoolConfig> {
    let ep = Endpoint::check(&src.spec).ok()?;
    let routing = ep.spec.intelligent_routing_spec.as_ref();
    Some(PoolConfig {
        name: pool_name(&src.namespace, &src.name),
        model: ep.spec.model_name.clone(),
        chunk_bytes: routing
            .and_then(|r| r.chunk_bytes)
            .unwrap_or(DEFAULT_CHUNK_BYTES),
        strategy: strategy_name(&ep.spec).to_owned(),
        strategy_config: routing
            .and_then(|r| r.strategy_config.clone())
            .unwrap_or_else(|| "{}".to_owned()),
        max_fallbacks: routing
            .and_then(|r| r.max_fallbacks)
            .unwrap_or(DEFAULT_MAX_FALLBACKS),
    })
}

/// Every pool with its ready members, sorted by name. Slices are matched to an endpoint by
/// namespace and the `kubernetes.io/service-name` label; only endpoints not marked unready
/// count, on the port named like the worker's invocation port.
pub fn pools(sources: &[PoolSource], slices: &[EndpointSlice]) -> Vec<Pool> {
    let mut out: Vec<Pool> = sources
        .iter()
        .filter_map(|src| {
            let config = pool_config(src)?;
            let port_name = &src.spec.worker.model_invocation_port.name;
            let mut members = BTreeSet::new();
            for slice in slices.iter().filter(|s| {
                s.metadata.namespace.as_deref() == Some(src.namespace.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&src.name)
            }) {
                let Some(port) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(port_name.as_str()))
                    .and_then(|p| p.port)
                else {
                    continue;
                };
                for e in &slice.endpoints {
                    let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    for addr in &e.addresses {
                        members.insert(if slice.address_type == "IPv6" {
                            format!("[{addr}]:{port}")
                        } else {
                            format!("{addr}:{port}")
                        });
                    }
                }
            }
            Some(Pool {
                namespace: src.namespace.clone(),
                name: src.name.clone(),
                config,
                endpoints: members.into_iter().collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    out
}
