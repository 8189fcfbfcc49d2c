//! Status shared by both kinds: replica counts, conditions and the placement record.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types set on every endpoint.
pub mod condition {
    /// All pieces applied and at least one replica serves.
    pub const READY: &str = "Ready";
    /// No pod of the endpoint is Unschedulable.
    pub const SCHEDULED: &str = "Scheduled";
    /// At least one replica passed its readiness probe (the model is loaded).
    pub const MODEL_LOADED: &str = "ModelLoaded";
    /// The KEDA ScaledObject is applied (or no autoscaling is asked for).
    pub const AUTOSCALER_READY: &str = "AutoscalerReady";
}

/// Observed state of an endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas of the Deployment (the scale subresource reads this).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas passing readiness.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, as a string (the scale subresource reads this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Scheduled, ModelLoaded, AutoscalerReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Where pods may run now, and how that came to be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    /// The gateway pool (Envoy cluster) serving this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Model resolved from the catalog (CatalogModel only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_model: Option<String>,
}

/// Placement record: the instance types pods may use now and each widening step.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// `Preferred`, `Ordered` or `NodeAffinity`.
    pub mode: String,
    /// Instance types the required node affinity allows now, in preference order.
    #[serde(default)]
    pub allowed_instance_types: Vec<String>,
    /// When pods were first seen Unschedulable at the current width (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable_since: Option<String>,
    /// Each widening, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<PlacementStep>,
}

/// One widening of an `Ordered` placement.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStep {
    /// When it happened (RFC 3339).
    pub at: String,
    /// The instance type added.
    pub added: String,
    /// Why: how many pods were Unschedulable and for how long.
    pub reason: String,
}
