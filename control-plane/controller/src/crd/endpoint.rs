//! `InferenceEndpointConfig`: one model served by a pool of model-server replicas.
//!
//! Field names follow the SageMaker HyperPod Inference Operator's
//! `inference.sagemaker.aws.amazon.com/v1` resource where they fit, so its users can move
//! over (`kvmesh-controller import-hyperpod` does the mechanical part).
// The KubeSchema derive re-declares each struct inside a private module to build its schema;
// `unreachable_pub` fires on those copies, not on the public types here.
#![allow(unreachable_pub)]

use k8s_openapi::api::core::v1::{EnvVar, NodeAffinity, Probe, ResourceRequirements};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::status::EndpointStatus;

/// Largest `instanceTypes` list; the preferred weights are spread over 1..=100.
pub const MAX_INSTANCE_TYPES: usize = 20;

/// The spec of an `InferenceEndpointConfig`.
// Each `printcolumn(...)` repeats the same keys; clippy reads them as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvmesh.io",
    version = "v1alpha1",
    kind = "InferenceEndpointConfig",
    namespaced,
    status = "EndpointStatus",
    shortname = "iec",
    category = "kvmesh",
    doc = "A model served by a pool of kvmesh model-server replicas behind the cache-aware gateway.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelName"),
    printcolumn(
        name = "Strategy",
        type_ = "string",
        json_path = ".spec.intelligentRoutingSpec.routingStrategy"
    ),
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
    validation = Rule::new("[has(self.instanceType), has(self.instanceTypes), has(self.nodeAffinity)].filter(x, x).size() == 1")
        .message("exactly one of instanceType, instanceTypes or nodeAffinity must be set"),
    validation = Rule::new("!has(self.schedulingPolicy) || self.schedulingPolicy.mode != 'Ordered' || has(self.instanceTypes)")
        .message("schedulingPolicy.mode Ordered needs an instanceTypes list to widen through")
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceEndpointConfigSpec {
    /// Model name clients send in the OpenAI `model` field; it also seeds the prompt chunk hashes.
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("modelName must not be empty"))]
    pub model_name: String,

    /// Where the model files come from.
    pub model_source_config: ModelSourceConfig,

    /// The model-server container.
    pub worker: Worker,

    /// Desired replicas when no autoscaler runs (the scale subresource writes this).
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,

    /// The one node instance type (`node.kubernetes.io/instance-type`) to run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("instanceType must not be empty"))]
    pub instance_type: Option<String>,

    /// Instance types in order of preference (1 to 20, no repeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20), inner(length(max = 63)))]
    #[x_kube(
        validation = Rule::new("self.size() >= 1 && self.size() <= 20")
            .message("instanceTypes must list between 1 and 20 types"),
        validation = Rule::new("self.all(t, self.filter(u, u == t).size() == 1)")
            .message("instanceTypes must not repeat a type"),
        validation = Rule::new("self.all(t, t.size() > 0)")
            .message("instanceTypes entries must not be empty")
    )]
    pub instance_types: Option<Vec<String>>,

    /// Custom node affinity, used as is (for placement rules beyond instance types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,

    /// How the instance-type preference is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_policy: Option<SchedulingPolicy>,

    /// KEDA autoscaling; absent means a fixed replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_scaling_spec: Option<AutoScalingSpec>,

    /// KV-cache tier sizes handed to the model server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_spec: Option<KvCacheSpec>,

    /// How the gateway picks a replica for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intelligent_routing_spec: Option<IntelligentRoutingSpec>,

    /// Prometheus scraping of the model server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

fn default_replicas() -> i32 {
    1
}

/// Where the model files come from; exactly the member named by `modelSourceType` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.modelSourceType != 's3' || has(self.s3Storage)")
        .message("modelSourceType s3 needs s3Storage"),
    validation = Rule::new("self.modelSourceType != 'fsx' || has(self.fsxStorage)")
        .message("modelSourceType fsx needs fsxStorage"),
    validation = Rule::new("self.modelSourceType != 'pvc' || has(self.pvc)")
        .message("modelSourceType pvc needs pvc"),
    validation = Rule::new("self.modelSourceType != 'hostPath' || has(self.hostPath)")
        .message("modelSourceType hostPath needs hostPath"),
    validation = Rule::new("[has(self.s3Storage), has(self.fsxStorage), has(self.pvc), has(self.hostPath)].filter(x, x).size() == 1")
        .message("set only the storage member that modelSourceType names")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSourceConfig {
    /// Which storage holds the model.
    pub model_source_type: ModelSourceType,
    /// An S3 bucket, mounted read-only through the Mountpoint for Amazon S3 CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_storage: Option<S3Storage>,
    /// An FSx for Lustre file system, mounted through the FSx CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsx_storage: Option<FsxStorage>,
    /// An existing PersistentVolumeClaim in the resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcStorage>,
    /// A directory on the node (single-node clusters, pre-seeded nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathStorage>,
    /// Folder inside the storage that holds the model (mounted as a subPath).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')")
        .message("modelLocation is a relative path without '..'"))]
    pub model_location: Option<String>,
}

/// The storage kinds a model can come from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelSourceType {
    /// S3 through the Mountpoint CSI driver.
    #[serde(rename = "s3")]
    S3,
    /// FSx for Lustre through its CSI driver.
    #[serde(rename = "fsx")]
    Fsx,
    /// A PersistentVolumeClaim.
    #[serde(rename = "pvc")]
    Pvc,
    /// A node directory.
    #[serde(rename = "hostPath")]
    HostPath,
}

/// An S3 bucket holding the model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Bucket name.
    #[x_kube(validation = Rule::new("self.size() >= 3 && self.size() <= 63")
        .message("bucketName must be 3 to 63 characters"))]
    pub bucket_name: String,
    /// Bucket region.
    pub region: String,
}

/// An FSx for Lustre file system holding the model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FsxStorage {
    /// File system id (`fs-...`).
    #[x_kube(validation = Rule::new("self.startsWith('fs-')").message("fileSystemId starts with fs-"))]
    pub file_system_id: String,
    /// DNS name of the file system.
    pub dns_name: String,
    /// Lustre mount name.
    pub mount_name: String,
}

/// An existing claim.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcStorage {
    /// Claim name in the resource's namespace.
    pub claim_name: String,
}

/// A node directory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathStorage {
    /// Absolute path on the node.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("hostPath.path must be absolute"))]
    pub path: String,
}

/// The model-server container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Worker {
    /// Container image of the model server (kvmesh-gpu-server or compatible).
    #[x_kube(validation = Rule::new("self.size() > 0").message("worker.image must not be empty"))]
    pub image: String,
    /// Port the server listens on for OpenAI requests.
    pub model_invocation_port: ModelInvocationPort,
    /// Where the model volume is mounted in the container.
    #[serde(default)]
    pub model_volume_mount: ModelVolumeMount,
    /// CPU, memory and accelerator requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment_variables: Vec<EnvVar>,
    /// Container entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Container arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Health probes; absent ones default to HTTP `GET /health` on the invocation port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Probes>,
}

/// The serving port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelInvocationPort {
    /// Container port.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("containerPort must be 1 to 65535"))]
    pub container_port: i32,
    /// Port name (also the Service port name).
    #[serde(default = "default_port_name")]
    pub name: String,
}

fn default_port_name() -> String {
    "http".to_owned()
}

/// The model volume's mount.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelVolumeMount {
    /// Volume name.
    #[serde(default = "default_volume_name")]
    pub name: String,
    /// Mount path in the container.
    #[serde(default = "default_mount_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("mountPath must be absolute"))]
    pub mount_path: String,
}

impl Default for ModelVolumeMount {
    fn default() -> Self {
        Self {
            name: default_volume_name(),
            mount_path: default_mount_path(),
        }
    }
}

fn default_volume_name() -> String {
    "model-weights".to_owned()
}

fn default_mount_path() -> String {
    "/opt/ml/model".to_owned()
}

/// Container probes.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    /// Readiness probe (the pool only routes to ready replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// Liveness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    /// Startup probe (model loading can take minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

/// How the instance-type list is applied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingPolicy {
    /// `Preferred`: every listed type is allowed at once, earlier ones weigh more.
    /// `Ordered`: only the first type is allowed; the controller widens to the next one each
    /// time pods stay Unschedulable for `fallbackDelay`.
    #[serde(default)]
    pub mode: SchedulingMode,
    /// How long pods may stay Unschedulable before `Ordered` widens (Go duration: 90s, 5m, 1h).
    #[serde(default = "default_fallback_delay")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(s|m|h))+$') && duration(self) > duration('0s')")
        .message("fallbackDelay is a positive duration such as 90s, 5m or 1h30m"))]
    pub fallback_delay: String,
}

fn default_fallback_delay() -> String {
    "5m".to_owned()
}

/// Placement modes.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SchedulingMode {
    /// All listed types allowed; preferred terms order them.
    #[default]
    Preferred,
    /// One type at a time, widening on Unschedulable pods.
    Ordered,
}

/// KEDA autoscaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicaCount <= self.maxReplicaCount")
    .message("minReplicaCount must not exceed maxReplicaCount"))]
#[serde(rename_all = "camelCase")]
pub struct AutoScalingSpec {
    /// Lowest replica count; 0 allows scale to zero.
    #[serde(default = "default_min_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("minReplicaCount must not be negative"))]
    pub min_replica_count: i32,
    /// Highest replica count.
    #[x_kube(validation = Rule::new("self >= 1").message("maxReplicaCount must be at least 1"))]
    pub max_replica_count: i32,
    /// Seconds between metric checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_interval: Option<i32>,
    /// Seconds after the last active trigger before scaling to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_period: Option<i32>,
    /// The Prometheus trigger; defaults to the model server's queue depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_trigger: Option<PrometheusTrigger>,
}

fn default_min_replicas() -> i32 {
    1
}

/// A KEDA Prometheus trigger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusTrigger {
    /// Prometheus URL; defaults to the controller's `--prometheus-address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_address: Option<String>,
    /// PromQL query; defaults to the summed `kvmesh_requests_waiting` of this endpoint's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Target value per replica.
    #[serde(default = "default_target")]
    #[x_kube(validation = Rule::new("self > 0.0").message("targetValue must be positive"))]
    pub target_value: f64,
    /// Value above which a scaled-to-zero endpoint wakes up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_target_value: Option<f64>,
}

fn default_target() -> f64 {
    4.0
}

/// KV-cache tiers of the model server.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Accelerator memory (the compute-side pool on CPU builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<KvTier>,
    /// Host DRAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<KvTier>,
    /// A local directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<KvDiskTier>,
}

/// One memory tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvTier {
    /// Whether the tier is used.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Capacity as a Kubernetes quantity (`8Gi`); absent lets the server size it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')")
        .message("size is a byte quantity such as 512Mi or 8Gi"))]
    pub size: Option<String>,
}

/// The disk tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvDiskTier {
    /// Whether the tier is used.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Capacity as a Kubernetes quantity; also the emptyDir size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')")
        .message("size is a byte quantity such as 100Gi"))]
    pub size: Option<String>,
    /// Directory in the container; an emptyDir volume is mounted there.
    #[serde(default = "default_disk_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("disk.path must be absolute"))]
    pub path: String,
}

fn yes() -> bool {
    true
}

fn default_disk_path() -> String {
    "/var/cache/kvmesh".to_owned()
}

/// Gateway routing for the endpoint's pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntelligentRoutingSpec {
    /// Cache-aware routing on; off means round-robin.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The strategy plugin.
    #[serde(default)]
    pub routing_strategy: RoutingStrategy,
    /// Prompt chunk size in bytes for prefix identity (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 16 && self <= 65536").message("chunkBytes must be 16 to 65536"))]
    pub chunk_bytes: Option<u32>,
    /// Replicas listed after the primary for retries (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 16").message("maxFallbacks must be at most 16"))]
    pub max_fallbacks: Option<u32>,
    /// Strategy parameters as a JSON object, passed to the plugin unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_config: Option<String>,
}

/// Routing strategies (the HyperPod names).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum RoutingStrategy {
    /// Affinity learned from the gateway's own decisions.
    #[default]
    Prefixaware,
    /// Scores by resident KV per tier minus queued prefill.
    Kvaware,
    /// Cache-agnostic.
    Roundrobin,
}

/// Prometheus scraping of the model server.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Scrape annotations on the pods.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the server exposes metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_metrics: Option<ModelMetrics>,
}

/// Metrics path and port.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelMetrics {
    /// HTTP path.
    #[serde(default = "default_metrics_path")]
    pub path: String,
    /// Port; defaults to the invocation port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

fn default_metrics_path() -> String {
    "/metrics".to_owned()
}
