//! Imports SageMaker HyperPod Inference Operator resources
//! (`inference.sagemaker.aws.amazon.com/v1` `InferenceEndpointConfig` and `JumpStartModel`)
//! into kvmesh ones, and reports every field it could not carry over.
//!
//! Mapping consumes fields from a copy of the input spec; whatever is left afterwards is
//! reported, as either a HyperPod field kvmesh has no equivalent for, or a field that is not in
//! the HyperPod v1 schema at all (the HyperPod API server would have pruned it silently).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value, json};
use thiserror::Error;

const KNOWN_FIELDS: &str = include_str!("known_fields.txt");
const GROUP: &str = "inference.sagemaker.aws.amazon.com";

/// Why an input cannot be imported at all.
#[derive(Debug, Error)]
pub enum ImportError {
    /// Not YAML, or not an object.
    #[error("input does not parse: {0}")]
    Parse(String),
    /// Not a HyperPod kind this importer knows.
    #[error(
        "unsupported apiVersion/kind {0}: expected {GROUP}/v1 InferenceEndpointConfig or JumpStartModel"
    )]
    Unsupported(String),
}

/// How a field was treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// A HyperPod field with no kvmesh equivalent; dropped.
    NoEquivalent,
    /// Not a field of the HyperPod v1 schema (HyperPod would have pruned it); dropped.
    NotInSchema,
    /// Carried over with a change of meaning the user should check.
    Changed,
}

/// One report line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Path in the input spec (`spec.server.maxAutoScaleReplicas`).
    pub path: String,
    /// What happened.
    pub kind: FindingKind,
    /// Why, for the reader.
    pub note: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            FindingKind::NoEquivalent => "not imported",
            FindingKind::NotInSchema => "not in the HyperPod v1 schema, not imported",
            FindingKind::Changed => "imported with a change",
        };
        write!(f, "{}: {k}: {}", self.path, self.note)
    }
}

/// One imported resource with its report.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The kvmesh resource (`InferenceEndpointConfig` or `CatalogModel`).
    pub resource: Value,
    /// Every field not carried over as is.
    pub findings: Vec<Finding>,
}

/// Imports every document of a YAML stream.
pub fn import_yaml(input: &str) -> Result<Vec<Imported>, ImportError> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(input) {
        let v: Value =
            serde::Deserialize::deserialize(doc).map_err(|e| ImportError::Parse(e.to_string()))?;
        if v.is_null() {
            continue;
        }
        out.push(import(&v)?);
    }
    Ok(out)
}

/// Imports one HyperPod resource.
pub fn import(input: &Value) -> Result<Imported, ImportError> {
    let api_version = input["apiVersion"].as_str().unwrap_or_default();
    let kind = input["kind"].as_str().unwrap_or_default();
    if api_version != format!("{GROUP}/v1")
        || !matches!(kind, "InferenceEndpointConfig" | "JumpStartModel")
    {
        return Err(ImportError::Unsupported(format!("{api_version} {kind}")));
    }
    let mut spec = input
        .get("spec")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let mut cx = Cx {
        kind,
        findings: Vec::new(),
    };
    let (our_kind, our_spec) = if kind == "InferenceEndpointConfig" {
        ("InferenceEndpointConfig", endpoint_spec(&mut cx, &mut spec))
    } else {
        ("CatalogModel", jumpstart_spec(&mut cx, &mut spec))
    };
    cx.report_leftovers(&spec, "spec");

    let mut metadata = Map::new();
    for key in ["name", "namespace", "labels", "annotations"] {
        if let Some(v) = input["metadata"].get(key) {
            metadata.insert(key.into(), v.clone());
        }
    }
    Ok(Imported {
        resource: json!({
            "apiVersion": "kvmesh.io/v1alpha1",
            "kind": our_kind,
            "metadata": metadata,
            "spec": our_spec,
        }),
        findings: cx.findings,
    })
}

struct Cx<'a> {
    kind: &'a str,
    findings: Vec<Finding>,
}

impl Cx<'_> {
    fn note(&mut self, path: &str, kind: FindingKind, note: impl Into<String>) {
        self.findings.push(Finding {
            path: format!("spec.{path}"),
            kind,
            note: note.into(),
        });
    }

    /// Drops a known field kvmesh has no use for, with the reason.
    fn drop_field(&mut self, spec: &mut Value, path: &str, why: &str) {
        if take(spec, path).is_some() {
            self.note(path, FindingKind::NoEquivalent, why);
        }
    }

    fn is_known(&self, path: &str) -> bool {
        let norm = normalise(path);
        KNOWN_FIELDS
            .lines()
            .filter_map(|l| l.strip_prefix(self.kind)?.strip_prefix(' '))
            .any(|known| match known.strip_suffix("/*") {
                Some(prefix) => {
                    norm == prefix
                        || norm.starts_with(&format!("{prefix}."))
                        || norm.starts_with(&format!("{prefix}[]"))
                }
                None => {
                    norm == known
                        || known.starts_with(&format!("{norm}."))
                        || known.starts_with(&format!("{norm}[]"))
                }
            })
    }

    fn report_leftovers(&mut self, v: &Value, path: &str) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = format!("{path}.{k}");
                    let rel = p.trim_start_matches("spec.").to_owned();
                    if !self.is_known(&rel) {
                        self.findings.push(Finding {
                            path: p,
                            kind: FindingKind::NotInSchema,
                            note: "HyperPod would have pruned it; nothing to carry over".into(),
                        });
                    } else {
                        self.report_leftovers(child, &p);
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    self.report_leftovers(child, &format!("{path}[{i}]"));
                }
            }
            _ if path != "spec" => self.findings.push(Finding {
                path: path.to_owned(),
                kind: FindingKind::NoEquivalent,
                note: "no kvmesh equivalent".into(),
            }),
            _ => {}
        }
    }
}

/// `a.b[3].c` -> `a.b[].c`
fn normalise(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Removes `a.b.c` from a JSON object tree and returns it; prunes emptied parents.
fn take(v: &mut Value, path: &str) -> Option<Value> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let obj = v.as_object_mut()?;
    match rest {
        None => obj.remove(head),
        Some(rest) => {
            let child = obj.get_mut(head)?;
            let got = take(child, rest);
            if child.as_object().is_some_and(Map::is_empty) {
                obj.remove(head);
            }
            got
        }
    }
}

fn put(out: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        out.insert(key.to_owned(), v);
    }
}

fn endpoint_spec(cx: &mut Cx<'_>, spec: &mut Value) -> Value {
    let mut out = Map::new();
    put(&mut out, "modelName", take(spec, "modelName"));
    put(&mut out, "instanceType", take(spec, "instanceType"));
    put(&mut out, "instanceTypes", take(spec, "instanceTypes"));
    put(&mut out, "nodeAffinity", take(spec, "nodeAffinity"));
    let replicas = take(spec, "replicas");
    let initial = take(spec, "InitialReplicaCount");
    match (replicas, initial) {
        (Some(r), i) => {
            out.insert("replicas".into(), r);
            if i.is_some() {
                cx.note(
                    "InitialReplicaCount",
                    FindingKind::NoEquivalent,
                    "replicas is set and wins",
                );
            }
        }
        (None, Some(i)) => {
            out.insert("replicas".into(), i);
            cx.note(
                "InitialReplicaCount",
                FindingKind::Changed,
                "became replicas",
            );
        }
        (None, None) => {}
    }
    if let Some(src) = model_source(cx, spec) {
        out.insert("modelSourceConfig".into(), src);
    }
    out.insert("worker".into(), worker(cx, spec));
    common(cx, spec, &mut out);

    cx.drop_field(
        spec,
        "endpointName",
        "SageMaker endpoint registration; kvmesh serves through its own gateway",
    );
    cx.drop_field(
        spec,
        "invocationEndpoint",
        "the gateway routes /v1/completions and /v1/chat/completions",
    );
    cx.drop_field(
        spec,
        "modelVersion",
        "informational in HyperPod; put the version in the image or model location",
    );
    cx.drop_field(
        spec,
        "loadBalancer.routingAlgorithm",
        "the ALB algorithm; the kvmesh gateway routes by intelligentRoutingSpec",
    );
    cx.drop_field(
        spec,
        "tlsConfig",
        "ALB certificates; terminate TLS at the kvmesh gateway (Envoy or Istio) instead",
    );
    cx.drop_field(spec, "dnsConfig", "Route 53 records are outside kvmesh");
    cx.drop_field(
        spec,
        "dataCapture",
        "SageMaker data capture has no kvmesh equivalent",
    );
    cx.drop_field(spec, "tags", "SageMaker endpoint tags");
    cx.drop_field(spec, "kubernetes", "init containers, volumes and service account overrides are not carried over; add them with a kustomize patch on the Deployment");
    cx.drop_field(
        spec,
        "pdSpec",
        "prefill/decode disaggregation is not supported",
    );
    cx.drop_field(
        spec,
        "maxDeployTimeInSeconds",
        "the startup probe bounds model loading instead",
    );
    Value::Object(out)
}

fn jumpstart_spec(cx: &mut Cx<'_>, spec: &mut Value) -> Value {
    let mut out = Map::new();
    put(&mut out, "modelId", take(spec, "model.modelId"));
    put(&mut out, "instanceType", take(spec, "server.instanceType"));
    put(&mut out, "replicas", take(spec, "replicas"));
    put(
        &mut out,
        "environmentVariables",
        take(spec, "environmentVariables"),
    );
    common(cx, spec, &mut out);
    cx.drop_field(
        spec,
        "model.modelHubName",
        "the kvmesh catalog ConfigMap replaces the SageMaker hub",
    );
    cx.drop_field(
        spec,
        "model.modelVersion",
        "pin the version in the catalog entry",
    );
    cx.drop_field(
        spec,
        "model.acceptEula",
        "accept the model licence when adding it to the catalog",
    );
    cx.drop_field(
        spec,
        "model.gatedModelDownloadRole",
        "gated models are staged into the catalog's storage",
    );
    cx.drop_field(
        spec,
        "model.additionalConfigs",
        "put serving options in the catalog entry's worker.args",
    );
    cx.drop_field(
        spec,
        "server.executionRole",
        "IAM roles are bound to the service account, outside the resource",
    );
    cx.drop_field(
        spec,
        "server.acceleratorPartitionType",
        "MIG partitions: request the partition resource in the catalog entry",
    );
    cx.drop_field(
        spec,
        "server.validations",
        "MIG partition validation has no equivalent",
    );
    cx.drop_field(
        spec,
        "sageMakerEndpoint",
        "SageMaker endpoint registration; kvmesh serves through its own gateway",
    );
    cx.drop_field(
        spec,
        "tlsConfig",
        "ALB certificates; terminate TLS at the kvmesh gateway instead",
    );
    cx.drop_field(
        spec,
        "loadBalancer",
        "the ALB; the kvmesh gateway replaces it",
    );
    cx.drop_field(spec, "dnsConfig", "Route 53 records are outside kvmesh");
    cx.drop_field(
        spec,
        "dataCapture",
        "SageMaker data capture has no kvmesh equivalent",
    );
    cx.drop_field(
        spec,
        "maxDeployTimeInSeconds",
        "the startup probe bounds model loading instead",
    );
    Value::Object(out)
}

/// Fields both kinds share: autoscaling, routing, KV cache, metrics.
fn common(cx: &mut Cx<'_>, spec: &mut Value, out: &mut Map<String, Value>) {
    if let Some(a) = autoscaling(cx, spec) {
        out.insert("autoScalingSpec".into(), a);
    }
    let mut routing = Map::new();
    put(
        &mut routing,
        "enabled",
        take(spec, "intelligentRoutingSpec.enabled"),
    );
    if let Some(s) = take(spec, "intelligentRoutingSpec.routingStrategy") {
        let name = s.as_str().unwrap_or_default().to_ascii_lowercase();
        if matches!(name.as_str(), "prefixaware" | "kvaware" | "roundrobin") {
            routing.insert("routingStrategy".into(), name.into());
        } else {
            routing.insert("routingStrategy".into(), "prefixaware".into());
            cx.note(
                "intelligentRoutingSpec.routingStrategy",
                FindingKind::Changed,
                format!("{name:?} is not a kvmesh strategy; prefixaware keeps sessions' shared prefixes together"),
            );
        }
    }
    cx.drop_field(
        spec,
        "intelligentRoutingSpec.autoScalingSpec",
        "the router's own autoscaling; the kvmesh gateway is scaled by its Deployment",
    );
    if !routing.is_empty() {
        out.insert("intelligentRoutingSpec".into(), Value::Object(routing));
    }

    let mut kv = Map::new();
    if let Some(l1) = take(spec, "kvCacheSpec.enableL1Cache") {
        kv.insert("host".into(), json!({"enabled": l1}));
        cx.note(
            "kvCacheSpec.enableL1Cache",
            FindingKind::Changed,
            "L1 (CPU offloading) became the host tier; set host.size to bound it",
        );
    }
    let l2 = take(spec, "kvCacheSpec.enableL2Cache");
    let backend = take(spec, "kvCacheSpec.l2CacheSpec.l2CacheBackend");
    let url = take(spec, "kvCacheSpec.l2CacheSpec.l2CacheLocalUrl");
    if l2.as_ref().and_then(Value::as_bool) == Some(true) {
        let b = backend
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if b == "tieredstorage" {
            kv.insert("disk".into(), json!({"enabled": true}));
            cx.note(
                "kvCacheSpec.l2CacheSpec",
                FindingKind::Changed,
                "tiered storage L2 became the local disk tier",
            );
        } else {
            cx.note(
                "kvCacheSpec.enableL2Cache",
                FindingKind::NoEquivalent,
                format!("a remote {b:?} L2 cache is not supported; kvmesh offers a local disk tier (kvCacheSpec.disk)"),
            );
            if url.is_some() {
                cx.note(
                    "kvCacheSpec.l2CacheSpec.l2CacheLocalUrl",
                    FindingKind::NoEquivalent,
                    "remote L2 URL unused",
                );
            }
        }
    }
    cx.drop_field(
        spec,
        "kvCacheSpec.cacheConfigFile",
        "LMCache configuration files do not apply to the kvmesh model server",
    );
    if !kv.is_empty() {
        out.insert("kvCacheSpec".into(), Value::Object(kv));
    }

    let mut metrics = Map::new();
    put(&mut metrics, "enabled", take(spec, "metrics.enabled"));
    let mut mm = Map::new();
    put(&mut mm, "path", take(spec, "metrics.modelMetrics.path"));
    put(&mut mm, "port", take(spec, "metrics.modelMetrics.port"));
    if !mm.is_empty() {
        metrics.insert("modelMetrics".into(), Value::Object(mm));
    }
    cx.drop_field(
        spec,
        "metrics.metricsScrapeIntervalSeconds",
        "set the interval in the Prometheus scrape configuration",
    );
    if !metrics.is_empty() {
        out.insert("metrics".into(), Value::Object(metrics));
    }
}

fn autoscaling(cx: &mut Cx<'_>, spec: &mut Value) -> Option<Value> {
    spec.get("autoScalingSpec")?;
    let mut a = Map::new();
    for k in [
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
    ] {
        put(&mut a, k, take(spec, &format!("autoScalingSpec.{k}")));
    }
    let mut t = Map::new();
    for k in [
        "serverAddress",
        "query",
        "targetValue",
        "activationTargetValue",
    ] {
        put(
            &mut t,
            k,
            take(spec, &format!("autoScalingSpec.prometheusTrigger.{k}")),
        );
    }
    if !t.is_empty() {
        a.insert("prometheusTrigger".into(), Value::Object(t));
    }
    cx.drop_field(spec, "autoScalingSpec.cloudWatchTrigger", "CloudWatch triggers are not supported; the default trigger is the model server's queue depth in Prometheus");
    cx.drop_field(
        spec,
        "autoScalingSpec.cloudWatchTriggerList",
        "CloudWatch triggers are not supported",
    );
    cx.drop_field(
        spec,
        "autoScalingSpec.prometheusTriggerList",
        "only one Prometheus trigger is supported",
    );
    for k in [
        "scaleUpStabilizationTime",
        "scaleDownStabilizationTime",
        "initialCooldownPeriod",
    ] {
        cx.drop_field(
            spec,
            &format!("autoScalingSpec.{k}"),
            "not exposed; edit the ScaledObject's advanced section if needed",
        );
    }
    if !a.contains_key("maxReplicaCount") {
        let min = a
            .get("minReplicaCount")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(1);
        a.insert("maxReplicaCount".into(), min.into());
        cx.note(
            "autoScalingSpec.maxReplicaCount",
            FindingKind::Changed,
            format!("absent; set to {min} (kvmesh requires it)"),
        );
    }
    Some(Value::Object(a))
}

fn model_source(cx: &mut Cx<'_>, spec: &mut Value) -> Option<Value> {
    spec.get("modelSourceConfig")?;
    let source_type = take(spec, "modelSourceConfig.modelSourceType");
    let mut src = Map::new();
    put(
        &mut src,
        "modelLocation",
        take(spec, "modelSourceConfig.modelLocation"),
    );
    match source_type.as_ref().and_then(Value::as_str) {
        Some("s3") => {
            src.insert("modelSourceType".into(), "s3".into());
            let mut s3 = Map::new();
            put(
                &mut s3,
                "bucketName",
                take(spec, "modelSourceConfig.s3Storage.bucketName"),
            );
            put(
                &mut s3,
                "region",
                take(spec, "modelSourceConfig.s3Storage.region"),
            );
            src.insert("s3Storage".into(), Value::Object(s3));
        }
        Some("fsx") => {
            src.insert("modelSourceType".into(), "fsx".into());
            let mut fsx = Map::new();
            for k in ["fileSystemId", "dnsName", "mountName"] {
                match take(spec, &format!("modelSourceConfig.fsxStorage.{k}")) {
                    Some(v) => {
                        fsx.insert(k.into(), v);
                    }
                    None => cx.note(
                        &format!("modelSourceConfig.fsxStorage.{k}"),
                        FindingKind::Changed,
                        "absent in the input but required by kvmesh (static FSx volume); fill it in",
                    ),
                }
            }
            src.insert("fsxStorage".into(), Value::Object(fsx));
        }
        other => {
            let name = other.unwrap_or("unset").to_owned();
            cx.note(
                "modelSourceConfig.modelSourceType",
                FindingKind::NoEquivalent,
                format!("{name:?} sources are not supported: stage the model into S3, FSx, a PVC or a host path"),
            );
        }
    }
    cx.drop_field(
        spec,
        "modelSourceConfig.prefetchEnabled",
        "the model server loads the weights at start; no separate prefetch",
    );
    cx.drop_field(
        spec,
        "modelSourceConfig.huggingFaceModel",
        "Hugging Face downloads are not supported",
    );
    Some(Value::Object(src))
}

fn worker(cx: &mut Cx<'_>, spec: &mut Value) -> Value {
    let mut w = Map::new();
    for k in [
        "image",
        "args",
        "command",
        "environmentVariables",
        "resources",
        "modelInvocationPort",
        "modelVolumeMount",
        "probes",
    ] {
        put(&mut w, k, take(spec, &format!("worker.{k}")));
    }
    // HyperPod samples write quantities as bare numbers (`nvidia.com/gpu: 1`); Kubernetes
    // quantities are strings.
    if let Some(res) = w.get_mut("resources") {
        for part in ["limits", "requests"] {
            if let Some(Value::Object(m)) = res.get_mut(part) {
                for v in m.values_mut() {
                    if v.is_number() {
                        *v = Value::String(v.to_string());
                    }
                }
            }
        }
    }
    if let Some(path) = take(spec, "loadBalancer.healthCheckPath") {
        let port = w
            .get("modelInvocationPort")
            .and_then(|p| p.get("name"))
            .cloned()
            .unwrap_or_else(|| "http".into());
        let probes = w.entry("probes").or_insert_with(|| json!({}));
        if probes.get("readinessProbe").is_none() {
            probes["readinessProbe"] =
                json!({"httpGet": {"path": path, "port": port}, "periodSeconds": 5});
            cx.note(
                "loadBalancer.healthCheckPath",
                FindingKind::Changed,
                "became the readiness probe (the pool routes only to ready replicas)",
            );
        }
    }
    cx.drop_field(spec, "worker.workingDir", "set it in the image");
    cx.drop_field(
        spec,
        "worker.requestLimits",
        "the gateway balances by queued prefill instead of per-pod request caps",
    );
    Value::Object(w)
}

/// The report as text lines, grouped per resource name.
pub fn report_text(imported: &[Imported]) -> String {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in imported {
        let name = format!(
            "{} {}",
            i.resource["kind"].as_str().unwrap_or_default(),
            i.resource["metadata"]["name"].as_str().unwrap_or_default()
        );
        let lines = by.entry(name).or_default();
        lines.extend(i.findings.iter().map(ToString::to_string));
    }
    let mut out = String::new();
    for (name, lines) in by {
        out.push_str(&format!(
            "{name}: {} field(s) not carried over as is\n",
            lines.len()
        ));
        for l in lines {
            out.push_str(&format!("  - {l}\n"));
        }
    }
    out
}
