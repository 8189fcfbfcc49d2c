//! Offline rendering for GitOps: resource documents in, every Kubernetes object out.

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;
use thiserror::Error;

use crate::checked::{Endpoint, SpecError, find_catalog_entry};
use crate::crd::{CatalogModel, InferenceEndpointConfig};
use crate::placement;
use crate::render::{Owner, RenderConfig, render};
use crate::resource::EndpointResource;

/// Why a file cannot be rendered.
#[derive(Debug, Error)]
pub enum OfflineError {
    /// A document is not YAML of a known kind.
    #[error("document {index}: {message}")]
    Document {
        /// 0-based document index.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A resource does not check.
    #[error("{kind} {name}: {source}")]
    Spec {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// The check that failed.
        source: SpecError,
    },
    /// Output serialisation failed.
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

/// Renders every document of `input` (with `catalog`, a ConfigMap YAML, for `CatalogModel`s)
/// into one YAML stream of Kubernetes objects, placement as a fresh resource starts.
pub fn render_yaml(
    input: &str,
    catalog: Option<&str>,
    cfg: &RenderConfig,
) -> Result<String, OfflineError> {
    let mut out = String::new();
    for object in render_objects(input, catalog, cfg)? {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&object)?);
    }
    Ok(out)
}

/// As [`render_yaml`], as JSON values.
pub fn render_objects(
    input: &str,
    catalog: Option<&str>,
    cfg: &RenderConfig,
) -> Result<Vec<Value>, OfflineError> {
    let catalog: Option<ConfigMap> =
        catalog
            .map(serde_yaml_ng::from_str)
            .transpose()
            .map_err(|e| OfflineError::Document {
                index: 0,
                message: format!("catalog ConfigMap: {e}"),
            })?;
    let mut out = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let bad = |message: String| OfflineError::Document { index, message };
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| bad(e.to_string()))?;
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str() {
            Some("InferenceEndpointConfig") => {
                let r: InferenceEndpointConfig =
                    serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
                out.extend(render_one(&r, None, cfg)?);
            }
            Some("CatalogModel") => {
                let r: CatalogModel = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
                let data = catalog
                    .as_ref()
                    .and_then(|c| c.data.clone())
                    .unwrap_or_default();
                let entry = find_catalog_entry(&data, &r.spec.model_id).map_err(|source| {
                    OfflineError::Spec {
                        kind: "CatalogModel",
                        name: r.metadata.name.clone().unwrap_or_default(),
                        source,
                    }
                })?;
                out.extend(render_one(&r, Some(&entry), cfg)?);
            }
            other => {
                return Err(bad(format!(
                    "kind {other:?} is not InferenceEndpointConfig or CatalogModel"
                )));
            }
        }
    }
    Ok(out)
}

fn render_one<K: EndpointResource>(
    r: &K,
    entry: Option<&crate::crd::CatalogEntry>,
    cfg: &RenderConfig,
) -> Result<Vec<Value>, OfflineError> {
    let name = r.meta().name.clone().unwrap_or_default();
    let spec_err = |source| OfflineError::Spec {
        kind: K::KIND_NAME,
        name: name.clone(),
        source,
    };
    let spec = r
        .endpoint_spec(entry)
        .ok_or_else(|| spec_err(SpecError::Catalog("no entry".into())))?;
    let ep = Endpoint::check(&spec).map_err(spec_err)?;
    let owner = Owner {
        kind: K::KIND_NAME,
        api_version: "kvmesh.io/v1alpha1",
        name: name.clone(),
        namespace: r
            .meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        uid: None,
    };
    let step = placement::advance(&ep.placement, None, 0, jiff::Timestamp::UNIX_EPOCH);
    Ok(render(&owner, &ep, &step.status, cfg).objects())
}
