//! `CatalogModel`: a model named by id and resolved through a catalog ConfigMap.
//!
//! Each data value of the catalog ConfigMap is one YAML [`CatalogEntry`]; the entry whose
//! `modelId` matches supplies the source, the image and the defaults, and the resource's own
//! fields override them.
// The KubeSchema derive re-declares each struct inside a private module to build its schema;
// `unreachable_pub` fires on those copies, not on the public types here.
#![allow(unreachable_pub)]

use k8s_openapi::api::core::v1::EnvVar;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::endpoint::{
    AutoScalingSpec, IntelligentRoutingSpec, KvCacheSpec, Metrics, ModelSourceConfig,
    SchedulingPolicy, Worker,
};
use super::status::EndpointStatus;

/// Default name of the catalog ConfigMap (in the resource's namespace).
pub const DEFAULT_CATALOG: &str = "kvmesh-model-catalog";

/// The spec of a `CatalogModel`.
// Each `printcolumn(...)` repeats the same keys; clippy reads them as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvmesh.io",
    version = "v1alpha1",
    kind = "CatalogModel",
    namespaced,
    status = "EndpointStatus",
    shortname = "catm",
    category = "kvmesh",
    doc = "A catalog model served by kvmesh: the model id is resolved through a catalog ConfigMap.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "ModelId", type_ = "string", json_path = ".spec.modelId"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Placement",
        type_ = "string",
        json_path = ".status.placement.allowedInstanceTypes"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!(has(self.instanceType) && has(self.instanceTypes))")
        .message("set at most one of instanceType or instanceTypes"),
    validation = Rule::new("!has(self.schedulingPolicy) || self.schedulingPolicy.mode != 'Ordered' || !has(self.instanceType)")
        .message("schedulingPolicy.mode Ordered needs an instanceTypes list, not instanceType")
)]
#[serde(rename_all = "camelCase")]
pub struct CatalogModelSpec {
    /// Catalog id of the model (the `modelId` of a catalog entry).
    #[x_kube(validation = Rule::new("self.size() > 0").message("modelId must not be empty"))]
    pub model_id: String,
    /// Catalog ConfigMap name in this namespace (default `kvmesh-model-catalog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// Desired replicas when no autoscaler runs.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,
    /// Overrides the catalog's instance types with one type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Overrides the catalog's instance types (1 to 20, no repeats, in preference order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20), inner(length(max = 63)))]
    #[x_kube(
        validation = Rule::new("self.size() >= 1 && self.size() <= 20")
            .message("instanceTypes must list between 1 and 20 types"),
        validation = Rule::new("self.all(t, self.filter(u, u == t).size() == 1)")
            .message("instanceTypes must not repeat a type")
    )]
    pub instance_types: Option<Vec<String>>,
    /// How the instance-type preference is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_policy: Option<SchedulingPolicy>,
    /// KEDA autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_scaling_spec: Option<AutoScalingSpec>,
    /// Overrides the catalog's KV-cache tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_spec: Option<KvCacheSpec>,
    /// Overrides the catalog's routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intelligent_routing_spec: Option<IntelligentRoutingSpec>,
    /// Overrides the catalog's metrics settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Added to (and overriding by name) the catalog's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment_variables: Vec<EnvVar>,
}

fn one() -> i32 {
    1
}

/// One model in a catalog ConfigMap (a YAML document per data key).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogEntry {
    /// Id that `CatalogModel.spec.modelId` names.
    pub model_id: String,
    /// Served model name (default: the id).
    #[serde(default)]
    pub model_name: Option<String>,
    /// Where the files are.
    pub model_source_config: ModelSourceConfig,
    /// The container: image, port, resources, args, probes.
    pub worker: Worker,
    /// Default instance types, in preference order.
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// Default KV-cache tiers.
    #[serde(default)]
    pub kv_cache_spec: Option<KvCacheSpec>,
    /// Default routing.
    #[serde(default)]
    pub intelligent_routing_spec: Option<IntelligentRoutingSpec>,
    /// Default metrics settings.
    #[serde(default)]
    pub metrics: Option<Metrics>,
}
