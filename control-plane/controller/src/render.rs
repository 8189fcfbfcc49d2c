//! Renders a checked endpoint into the Kubernetes objects that serve it. Pure: no API calls,
//! so `kvmesh-controller render` produces offline exactly what the controller applies.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, CSIPersistentVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, PodSpec, PodTemplateSpec, Probe,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::checked::{Endpoint, Placement};
use crate::crd::endpoint::ModelSourceType;
use crate::crd::status::PlacementStatus;

/// Field manager for every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "kvmesh-controller";
/// Label naming the endpoint a pod or object belongs to.
pub const ENDPOINT_LABEL: &str = "kvmesh.io/endpoint";
/// Label naming the endpoint's kind.
pub const KIND_LABEL: &str = "kvmesh.io/endpoint-kind";
/// Annotation on the Service naming the gateway pool.
pub const POOL_ANNOTATION: &str = "kvmesh.io/pool";
/// Label on cluster-scoped objects naming the owner's uid (they cannot carry owner references).
pub const OWNER_UID_LABEL: &str = "kvmesh.io/owner-uid";

/// The resource being rendered.
#[derive(Debug, Clone)]
pub struct Owner {
    /// `InferenceEndpointConfig` or `CatalogModel`.
    pub kind: &'static str,
    /// `kvmesh.io/v1alpha1`.
    pub api_version: &'static str,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Uid; `None` offline (then no owner references are written).
    pub uid: Option<String>,
}

impl Owner {
    /// The gateway pool name (`<namespace>/<name>`), also the Envoy cluster name.
    /// The control plane's name for this endpoint's pool (`<namespace>.<name>`).
    pub fn pool(&self) -> String {
        crate::pools::pool_name(&self.namespace, &self.name)
    }

    /// Labels selecting this endpoint's pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ENDPOINT_LABEL.to_owned(), self.name.clone()),
            (KIND_LABEL.to_owned(), self.kind.to_owned()),
        ])
    }

    /// The selector as the string the scale subresource wants.
    pub fn selector_string(&self) -> String {
        self.selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.selector();
        l.insert(
            "app.kubernetes.io/name".into(),
            "kvmesh-model-server".into(),
        );
        l.insert("app.kubernetes.io/instance".into(), self.name.clone());
        l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        l
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: self.uid.as_ref().map(|uid| {
                vec![OwnerReference {
                    api_version: self.api_version.to_owned(),
                    kind: self.kind.to_owned(),
                    name: self.name.clone(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            }),
            ..Default::default()
        }
    }

    /// Name of the cluster-scoped PersistentVolume for S3 and FSx sources.
    pub fn pv_name(&self) -> String {
        format!("kvmesh-{}-{}-model", self.namespace, self.name)
    }
}

/// Controller-wide rendering settings.
#[derive(Debug, Clone)]
pub struct RenderConfig {
    /// Default Prometheus for KEDA triggers.
    pub prometheus_address: String,
    /// Control-plane address the model servers report their state to (`KVMESH_CONTROL_PLANE`).
    pub control_plane_address: Option<String>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            prometheus_address: "http://prometheus-operated.monitoring.svc:9090".into(),
            control_plane_address: Some(
                "http://kvmesh-control-plane.kvmesh-system.svc:18000".into(),
            ),
        }
    }
}

/// Every object one endpoint needs.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Cluster-scoped volume for S3 (Mountpoint CSI) and FSx sources.
    pub persistent_volume: Option<PersistentVolume>,
    /// Claim bound to that volume.
    pub persistent_volume_claim: Option<PersistentVolumeClaim>,
    /// The model servers.
    pub deployment: Deployment,
    /// Selects the model servers; its EndpointSlices feed the gateway pool.
    pub service: Service,
    /// KEDA autoscaling (`keda.sh/v1alpha1`), when asked for.
    pub scaled_object: Option<Value>,
}

impl Rendered {
    /// All objects as JSON, in apply order (volume, claim, deployment, service, autoscaler).
    pub fn objects(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(pv) = &self.persistent_volume {
            out.push(typed_json(pv));
        }
        if let Some(pvc) = &self.persistent_volume_claim {
            out.push(typed_json(pvc));
        }
        out.push(typed_json(&self.deployment));
        out.push(typed_json(&self.service));
        if let Some(so) = &self.scaled_object {
            out.push(so.clone());
        }
        out
    }
}

fn typed_json<K: k8s_openapi::Resource + serde::Serialize>(k: &K) -> Value {
    // k8s-openapi types have string keys and no custom serialisers that can fail.
    let mut v = serde_json::to_value(k).expect("k8s-openapi objects serialise to JSON");
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), K::API_VERSION.into());
        o.insert("kind".into(), K::KIND.into());
    }
    v
}

/// Renders an endpoint with the given placement.
pub fn render(
    owner: &Owner,
    ep: &Endpoint,
    placement: &PlacementStatus,
    cfg: &RenderConfig,
) -> Rendered {
    let (pv, pvc) = model_volume_objects(owner, ep);
    Rendered {
        persistent_volume: pv,
        persistent_volume_claim: pvc,
        deployment: deployment(owner, ep, placement, cfg),
        service: service(owner, ep),
        scaled_object: scaled_object(owner, ep, cfg),
    }
}

fn deployment(
    owner: &Owner,
    ep: &Endpoint,
    placement: &PlacementStatus,
    cfg: &RenderConfig,
) -> Deployment {
    let spec = &ep.spec;
    let port = &spec.worker.model_invocation_port;
    let node_affinity = match &ep.placement {
        Placement::NodeAffinity => spec.node_affinity.clone(),
        Placement::InstanceTypes { .. } => Some(crate::affinity::instance_type_affinity(
            &placement.allowed_instance_types,
        )),
    };
    let mut annotations = BTreeMap::new();
    if spec.metrics.as_ref().is_none_or(|m| m.enabled) {
        let mm = spec.metrics.as_ref().and_then(|m| m.model_metrics.as_ref());
        annotations.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
        annotations.insert(
            "prometheus.io/port".to_owned(),
            mm.and_then(|m| m.port)
                .unwrap_or(port.container_port)
                .to_string(),
        );
        annotations.insert(
            "prometheus.io/path".to_owned(),
            mm.map_or_else(|| "/metrics".to_owned(), |m| m.path.clone()),
        );
    }

    let mount = &spec.worker.model_volume_mount;
    let mut volumes = vec![model_volume(owner, ep)];
    let mut mounts = vec![VolumeMount {
        name: mount.name.clone(),
        mount_path: mount.mount_path.clone(),
        sub_path: spec.model_source_config.model_location.clone(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(dir) = &ep.kv_disk_dir {
        volumes.push(Volume {
            name: "kv-disk".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: ep
                    .kv
                    .disk
                    .filter(|b| *b > 0)
                    .map(|b| Quantity(b.to_string())),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "kv-disk".into(),
            mount_path: dir.clone(),
            ..Default::default()
        });
    }

    let probes = spec.worker.probes.clone().unwrap_or_default();
    let health = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::String(port.name.clone()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let container = Container {
        name: "model-server".into(),
        image: Some(spec.worker.image.clone()),
        command: non_empty(&spec.worker.command),
        args: non_empty(&spec.worker.args),
        ports: Some(vec![ContainerPort {
            name: Some(port.name.clone()),
            container_port: port.container_port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env(owner, ep, cfg)),
        resources: spec.worker.resources.clone(),
        volume_mounts: Some(mounts),
        // Model loading can take long: the startup probe allows 30 minutes before liveness starts.
        startup_probe: Some(probes.startup_probe.unwrap_or_else(|| health(10, 180))),
        readiness_probe: Some(probes.readiness_probe.unwrap_or_else(|| health(5, 3))),
        liveness_probe: Some(probes.liveness_probe.unwrap_or_else(|| health(20, 3))),
        ..Default::default()
    };
    Deployment {
        metadata: owner.meta(owner.name.clone()),
        spec: Some(DeploymentSpec {
            // With an autoscaler, KEDA's HPA owns the replica count.
            replicas: spec.auto_scaling_spec.is_none().then_some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(owner.selector()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(owner.labels()),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    affinity: node_affinity.map(|n| Affinity {
                        node_affinity: Some(n),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// The model server's environment: what it serves, where it reports, its KV tiers. Names are
/// documented in docs/architecture.md; the user's own variables win on a clash.
fn env(owner: &Owner, ep: &Endpoint, cfg: &RenderConfig) -> Vec<EnvVar> {
    let spec = &ep.spec;
    let val = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    };
    let mut ours = vec![
        val("KVMESH_MODEL_NAME", spec.model_name.clone()),
        val(
            "KVMESH_MODEL_PATH",
            spec.worker.model_volume_mount.mount_path.clone(),
        ),
        val(
            "KVMESH_PORT",
            spec.worker.model_invocation_port.container_port.to_string(),
        ),
        // The server binds loopback unless told otherwise; in a pod it must take traffic
        // from the gateway.
        val(
            "KVMESH_LISTEN",
            format!(
                "0.0.0.0:{}",
                spec.worker.model_invocation_port.container_port
            ),
        ),
        val("KVMESH_POOL", owner.pool()),
        field("KVMESH_REPLICA_ID", "metadata.name"),
        field("KVMESH_POD_IP", "status.podIP"),
        val(
            "KVMESH_ADVERTISE_ADDRESS",
            format!(
                "$(KVMESH_POD_IP):{}",
                spec.worker.model_invocation_port.container_port
            ),
        ),
    ];
    if let Some(cp) = &cfg.control_plane_address {
        ours.push(val("KVMESH_CONTROL_PLANE", cp.clone()));
    }
    for (name, bytes) in [
        ("KVMESH_KV_DEVICE_BYTES", ep.kv.device),
        ("KVMESH_KV_HOST_BYTES", ep.kv.host),
        ("KVMESH_KV_DISK_BYTES", ep.kv.disk),
    ] {
        if let Some(b) = bytes {
            ours.push(val(name, b.to_string()));
        }
    }
    if let Some(dir) = &ep.kv_disk_dir {
        ours.push(val("KVMESH_KV_DISK_DIR", dir.clone()));
    }
    let user = &spec.worker.environment_variables;
    ours.retain(|o| !user.iter().any(|u| u.name == o.name));
    // Variables referring to $(KVMESH_POD_IP) must come after it: keep ours first.
    ours.extend(user.iter().cloned());
    ours
}

fn model_volume(owner: &Owner, ep: &Endpoint) -> Volume {
    let src = &ep.spec.model_source_config;
    let name = ep.spec.worker.model_volume_mount.name.clone();
    let claim = |claim_name: String| PersistentVolumeClaimVolumeSource {
        claim_name,
        read_only: Some(true),
    };
    match src.model_source_type {
        ModelSourceType::S3 | ModelSourceType::Fsx => Volume {
            name,
            persistent_volume_claim: Some(claim(format!("{}-model", owner.name))),
            ..Default::default()
        },
        ModelSourceType::Pvc => Volume {
            name,
            persistent_volume_claim: src.pvc.as_ref().map(|p| claim(p.claim_name.clone())),
            ..Default::default()
        },
        ModelSourceType::HostPath => Volume {
            name,
            host_path: src.host_path.as_ref().map(|h| HostPathVolumeSource {
                path: h.path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        },
    }
}

/// Static provisioning for S3 (Mountpoint CSI) and FSx for Lustre: a PersistentVolume naming
/// the bucket or file system, pre-bound to a claim in the endpoint's namespace.
fn model_volume_objects(
    owner: &Owner,
    ep: &Endpoint,
) -> (Option<PersistentVolume>, Option<PersistentVolumeClaim>) {
    let src = &ep.spec.model_source_config;
    let (csi, access, mount_options) =
        match (src.model_source_type, &src.s3_storage, &src.fsx_storage) {
            (ModelSourceType::S3, Some(s3), _) => (
                CSIPersistentVolumeSource {
                    driver: "s3.csi.aws.com".into(),
                    volume_handle: format!("{}-s3", owner.pv_name()),
                    volume_attributes: Some(BTreeMap::from([(
                        "bucketName".to_owned(),
                        s3.bucket_name.clone(),
                    )])),
                    ..Default::default()
                },
                "ReadOnlyMany",
                Some(vec![
                    "allow-other".to_owned(),
                    format!("region {}", s3.region),
                ]),
            ),
            (ModelSourceType::Fsx, _, Some(fsx)) => (
                CSIPersistentVolumeSource {
                    driver: "fsx.csi.aws.com".into(),
                    volume_handle: fsx.file_system_id.clone(),
                    volume_attributes: Some(BTreeMap::from([
                        ("dnsname".to_owned(), fsx.dns_name.clone()),
                        ("mountname".to_owned(), fsx.mount_name.clone()),
                    ])),
                    ..Default::default()
                },
                "ReadOnlyMany",
                Some(vec!["flock".to_owned()]),
            ),
            _ => return (None, None),
        };
    // Static volumes ignore the size; the API requires one.
    let size = BTreeMap::from([("storage".to_owned(), Quantity("1200Gi".into()))]);
    let claim_name = format!("{}-model", owner.name);
    let mut pv_labels = owner.labels();
    if let Some(uid) = &owner.uid {
        pv_labels.insert(OWNER_UID_LABEL.into(), uid.clone());
    }
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(owner.pv_name()),
            labels: Some(pv_labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(size.clone()),
            access_modes: Some(vec![access.into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            mount_options,
            claim_ref: Some(ObjectReference {
                namespace: Some(owner.namespace.clone()),
                name: Some(claim_name.clone()),
                ..Default::default()
            }),
            csi: Some(csi),
            ..Default::default()
        }),
        status: None,
    };
    let pvc = PersistentVolumeClaim {
        metadata: owner.meta(claim_name),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access.into()]),
            storage_class_name: Some(String::new()),
            volume_name: Some(owner.pv_name()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(size),
                limits: None,
            }),
            ..Default::default()
        }),
        status: None,
    };
    (Some(pv), Some(pvc))
}

fn service(owner: &Owner, ep: &Endpoint) -> Service {
    let port = &ep.spec.worker.model_invocation_port;
    let mut meta = owner.meta(owner.name.clone());
    meta.annotations = Some(BTreeMap::from([(POOL_ANNOTATION.to_owned(), owner.pool())]));
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(owner.selector()),
            ports: Some(vec![ServicePort {
                name: Some(port.name.clone()),
                port: port.container_port,
                target_port: Some(IntOrString::String(port.name.clone())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The default autoscaling query: the endpoint's summed queue of waiting requests.
pub fn default_query(owner: &Owner) -> String {
    format!(
        "sum(kvmesh_requests_waiting{{namespace=\"{}\",pod=~\"{}-[a-z0-9]+-[a-z0-9]{{5}}\"}})",
        owner.namespace, owner.name
    )
}

fn scaled_object(owner: &Owner, ep: &Endpoint, cfg: &RenderConfig) -> Option<Value> {
    let a = ep.spec.auto_scaling_spec.as_ref()?;
    let trigger = a.prometheus_trigger.as_ref();
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "serverAddress".into(),
        trigger
            .and_then(|t| t.server_address.clone())
            .unwrap_or_else(|| cfg.prometheus_address.clone())
            .into(),
    );
    metadata.insert(
        "query".into(),
        trigger
            .and_then(|t| t.query.clone())
            .unwrap_or_else(|| default_query(owner))
            .into(),
    );
    metadata.insert(
        "threshold".into(),
        number(trigger.map_or(4.0, |t| t.target_value)).into(),
    );
    if let Some(act) = trigger.and_then(|t| t.activation_target_value) {
        metadata.insert("activationThreshold".into(), number(act).into());
    }
    let mut spec = json!({
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
        "minReplicaCount": a.min_replica_count,
        "maxReplicaCount": a.max_replica_count,
        "triggers": [{"type": "prometheus", "metadata": metadata}],
    });
    if let Some(p) = a.polling_interval {
        spec["pollingInterval"] = p.into();
    }
    if let Some(c) = a.cooldown_period {
        spec["cooldownPeriod"] = c.into();
    }
    let meta = serde_json::to_value(owner.meta(owner.name.clone()))
        .expect("ObjectMeta serialises to JSON");
    Some(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta,
        "spec": spec,
    }))
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        v.to_string()
    }
}
