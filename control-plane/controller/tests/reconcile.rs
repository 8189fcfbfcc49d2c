//! The reconciler against a fake API server (tower-test): the requests it makes (server-side
//! apply with the field manager, finalizer add and remove, status patches, events), its handling
//! of invalid resources, and the `Ordered` fallback driven by fake Unschedulable pods in paused
//! time.
#![allow(clippy::unwrap_used)] // test helpers, like #[test] bodies, may unwrap

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use kvmesh_control_plane_controller::crd::{CatalogModel, InferenceEndpointConfig};
use kvmesh_control_plane_controller::reconcile::{self, CATALOG_RETRY, Clock, Context, RESYNC};
use kvmesh_control_plane_controller::render::RenderConfig;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct Cluster {
    requests: Vec<Req>,
    /// The instance type nodes have free capacity for; pods whose required affinity excludes it
    /// are Unschedulable.
    free_type: Option<String>,
    replicas: i64,
    keda: bool,
    last_deployment: Option<Value>,
    persistent_volume: Option<Value>,
    configmap: Option<Value>,
    /// An existing Deployment of the endpoint's name.
    existing_deployment: Option<Value>,
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

fn allowed_types(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
        .as_array()
        .map(|v| v.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

impl Cluster {
    fn pods(&self) -> Value {
        let Some(dep) = &self.last_deployment else {
            return json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []});
        };
        let schedulable = self
            .free_type
            .as_ref()
            .is_none_or(|t| allowed_types(dep).contains(t));
        let items: Vec<Value> = (0..self.replicas)
            .map(|i| {
                let cond = if schedulable {
                    json!({"type": "PodScheduled", "status": "True"})
                } else {
                    json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"})
                };
                json!({"metadata": {"name": format!("p{i}"), "namespace": "ns"}, "status": {"phase": "Pending", "conditions": [cond]}})
            })
            .collect();
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
    }

    fn route(&mut self, r: &Req) -> (StatusCode, Value) {
        let p = r.path.as_str();
        match (r.method.as_str(), p) {
            ("GET", "/api/v1/namespaces/ns/pods") => (StatusCode::OK, self.pods()),
            ("GET", _) if p.starts_with("/apis/apps/v1/namespaces/ns/deployments/") => self
                .existing_deployment
                .clone()
                .map_or_else(not_found, |d| (StatusCode::OK, d)),
            ("GET", _) if p.starts_with("/api/v1/namespaces/ns/configmaps/") => self
                .configmap
                .clone()
                .map_or_else(not_found, |c| (StatusCode::OK, c)),
            ("GET", _) if p.starts_with("/api/v1/persistentvolumes/") => self
                .persistent_volume
                .clone()
                .map_or_else(not_found, |v| (StatusCode::OK, v)),
            ("DELETE", _) if p.starts_with("/api/v1/persistentvolumes/") => self
                .persistent_volume
                .take()
                .map_or_else(not_found, |v| (StatusCode::OK, v)),
            ("DELETE", _) if p.contains("/scaledobjects/") => not_found(),
            ("POST" | "PATCH", _) if p.contains("/events") => (StatusCode::CREATED, r.body.clone()),
            ("PATCH", _) if p.contains("/scaledobjects/") && !self.keda => not_found(),
            ("PATCH", _) if p.contains("/deployments/") => {
                self.last_deployment = Some(r.body.clone());
                let mut d = r.body.clone();
                let schedulable = self
                    .free_type
                    .as_ref()
                    .is_none_or(|t| allowed_types(&d).contains(t));
                d["status"] = json!({"replicas": self.replicas, "readyReplicas": if schedulable { self.replicas } else { 0 }});
                (StatusCode::OK, d)
            }
            ("PATCH", _) if p.ends_with("/status") => {
                // Answer with the whole resource, as the API server does.
                let mut obj = if p.contains("/catalogmodels/") {
                    json!({"apiVersion": "kvmesh.io/v1alpha1", "kind": "CatalogModel", "spec": {"modelId": "x"}})
                } else {
                    endpoint(true, None)
                };
                obj["metadata"] = json!({"name": "m", "namespace": "ns"});
                obj["status"] = r.body["status"].clone();
                (StatusCode::OK, obj)
            }
            // Finalizer patches: answer with a resource of the right shape.
            ("PATCH", _) if r.content_type.contains("json-patch") => {
                (StatusCode::OK, endpoint(false, None))
            }
            ("PATCH", _) => (StatusCode::OK, r.body.clone()),
            _ => panic!("unexpected request {} {}", r.method, r.path),
        }
    }
}

fn fake(cluster: Cluster) -> (Client, Arc<Mutex<Cluster>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let state = Arc::new(Mutex::new(cluster));
    let server = state.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let r = Req {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, out) = {
                let mut c = server.lock().unwrap();
                let res = c.route(&r);
                c.requests.push(r);
                res
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "ns"), state)
}

fn endpoint(with_finalizer: bool, spec_edit: Option<&dyn Fn(&mut Value)>) -> Value {
    let mut v = json!({
        "apiVersion": "kvmesh.io/v1alpha1",
        "kind": "InferenceEndpointConfig",
        "metadata": {"name": "m", "namespace": "ns", "uid": "uid-1", "generation": 3},
        "spec": {
            "modelName": "llama",
            "replicas": 2,
            "instanceTypes": ["ml.p4d.24xlarge", "ml.g5.24xlarge", "ml.g5.8xlarge"],
            "schedulingPolicy": {"mode": "Ordered", "fallbackDelay": "5m"},
            "modelSourceConfig": {"modelSourceType": "s3", "s3Storage": {"bucketName": "bucket", "region": "us-west-2"}},
            "worker": {"image": "img", "modelInvocationPort": {"containerPort": 8000}},
            "autoScalingSpec": {"minReplicaCount": 0, "maxReplicaCount": 4}
        }
    });
    if with_finalizer {
        v["metadata"]["finalizers"] = json!(["kvmesh.io/cleanup"]);
    }
    if let Some(edit) = spec_edit {
        edit(&mut v["spec"]);
    }
    v
}

fn iec(v: Value) -> InferenceEndpointConfig {
    serde_json::from_value(v).unwrap()
}

fn ctx(client: Client) -> Arc<Context> {
    let start = "2026-01-01T00:00:00Z".parse().unwrap();
    Arc::new(Context::new(
        client,
        RenderConfig::default(),
        Clock::starting_at(start),
    ))
}

fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} condition"))
}

#[tokio::test]
async fn a_new_endpoint_gets_the_finalizer_before_anything_is_applied() {
    let (client, state) = fake(Cluster {
        replicas: 1,
        keda: true,
        ..Default::default()
    });
    reconcile::reconcile(Arc::new(iec(endpoint(false, None))), ctx(client))
        .await
        .unwrap();
    let reqs = state.lock().unwrap().requests.clone();
    assert_eq!(reqs.len(), 1, "only the finalizer patch: {reqs:?}");
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        (
            "PATCH",
            "/apis/kvmesh.io/v1alpha1/namespaces/ns/inferenceendpointconfigs/m"
        )
    );
    assert_eq!(r.content_type, "application/json-patch+json");
    let ops = r.body.as_array().unwrap();
    assert!(ops.iter().any(|o| o["op"] == "add"
        && o["path"] == "/metadata/finalizers"
        && o["value"] == json!(["kvmesh.io/cleanup"])));
}

#[tokio::test]
async fn apply_uses_server_side_apply_with_owner_references_and_patches_status() {
    let (client, state) = fake(Cluster {
        replicas: 1,
        keda: true,
        ..Default::default()
    });
    reconcile::reconcile(Arc::new(iec(endpoint(true, None))), ctx(client))
        .await
        .unwrap();
    let reqs = state.lock().unwrap().requests.clone();
    let applies: Vec<&Req> = reqs
        .iter()
        .filter(|r| r.content_type == "application/apply-patch+yaml")
        .collect();
    let paths: Vec<&str> = applies.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/persistentvolumes/kvmesh-ns-m-model",
            "/api/v1/namespaces/ns/persistentvolumeclaims/m-model",
            "/apis/apps/v1/namespaces/ns/deployments/m",
            "/api/v1/namespaces/ns/services/m",
            "/apis/keda.sh/v1alpha1/namespaces/ns/scaledobjects/m",
            "/apis/kvmesh.io/v1alpha1/namespaces/ns/inferenceendpointconfigs/m/status",
        ]
    );
    for r in &applies {
        assert_eq!(r.method, "PATCH");
        assert!(
            r.query.contains("fieldManager=kvmesh-controller"),
            "{}",
            r.query
        );
        assert!(r.query.contains("force=true"), "{}", r.query);
    }
    let dep = &applies[2].body;
    let owner = &dep["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            owner["kind"].as_str(),
            owner["uid"].as_str(),
            owner["controller"].as_bool()
        ),
        (Some("InferenceEndpointConfig"), Some("uid-1"), Some(true))
    );
    assert!(
        applies[0].body["metadata"].get("ownerReferences").is_none(),
        "cluster-scoped PV has no owner reference"
    );
    assert_eq!(
        applies[0].body["metadata"]["labels"]["kvmesh.io/owner-uid"],
        "uid-1"
    );

    let status = &applies[5].body["status"];
    assert_eq!(
        status["selector"],
        "kvmesh.io/endpoint=m,kvmesh.io/endpoint-kind=InferenceEndpointConfig"
    );
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["pool"], "ns.m");
    assert_eq!(
        status["placement"]["allowedInstanceTypes"],
        json!(["ml.p4d.24xlarge"])
    );
    for (t, s, reason) in [
        ("Ready", "True", "Available"),
        ("Scheduled", "True", "AllPodsScheduled"),
        ("ModelLoaded", "True", "ReplicasReady"),
        ("AutoscalerReady", "True", "ScaledObjectApplied"),
    ] {
        let c = cond(status, t);
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some(s), Some(reason)),
            "{t}: {c}"
        );
    }
}

#[tokio::test]
async fn deletion_releases_the_volume_then_removes_the_finalizer() {
    let pv = json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "kvmesh-ns-m-model", "labels": {"kvmesh.io/owner-uid": "uid-1"}}});
    let (client, state) = fake(Cluster {
        persistent_volume: Some(pv),
        ..Default::default()
    });
    let mut obj = endpoint(true, None);
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    reconcile::reconcile(Arc::new(iec(obj)), ctx(client))
        .await
        .unwrap();
    let st = state.lock().unwrap();
    let seq: Vec<String> = st
        .requests
        .iter()
        .filter(|r| !r.path.contains("/events"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seq,
        [
            "GET /api/v1/persistentvolumes/kvmesh-ns-m-model",
            "DELETE /api/v1/persistentvolumes/kvmesh-ns-m-model",
            "PATCH /apis/kvmesh.io/v1alpha1/namespaces/ns/inferenceendpointconfigs/m",
        ]
    );
    assert!(st.persistent_volume.is_none());
    assert!(
        st.requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "Cleanup")
    );
    let last = st.requests.last().unwrap();
    let ops = last.body.as_array().unwrap();
    assert_eq!(ops[0]["op"], "test");
    assert_eq!(ops[0]["value"], "kvmesh.io/cleanup");
    assert_eq!(ops[1]["op"], "remove");
    assert_eq!(ops[1]["path"], "/metadata/finalizers/0");
}

#[tokio::test]
async fn a_volume_of_another_owner_is_left_alone_on_deletion() {
    let pv = json!({"apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "kvmesh-ns-m-model", "labels": {"kvmesh.io/owner-uid": "someone-else"}}});
    let (client, state) = fake(Cluster {
        persistent_volume: Some(pv),
        ..Default::default()
    });
    let mut obj = endpoint(true, None);
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    reconcile::reconcile(Arc::new(iec(obj)), ctx(client))
        .await
        .unwrap();
    let st = state.lock().unwrap();
    assert!(st.persistent_volume.is_some());
    assert!(!st.requests.iter().any(|r| r.method == "DELETE"));
    assert!(
        !st.requests.iter().any(|r| r.path.contains("/events")),
        "nothing to report"
    );
    let last = st.requests.last().unwrap();
    assert_eq!(last.body[1]["op"], "remove", "the finalizer still goes");
}

#[tokio::test]
async fn an_invalid_spec_gets_a_condition_and_waits_for_an_edit() {
    let (client, state) = fake(Cluster::default());
    let bad = endpoint(
        true,
        Some(&|s: &mut Value| s["instanceType"] = json!("ml.g5.8xlarge")),
    );
    let pass = reconcile::apply(&iec(bad.clone()), &ctx(client.clone()))
        .await
        .unwrap();
    assert_eq!(pass.requeue_after, None, "no retry loop for a bad spec");
    let reqs = state.lock().unwrap().requests.clone();
    assert!(
        !reqs.iter().any(|r| r.path.contains("/deployments/")),
        "nothing applied"
    );
    let status = reqs
        .iter()
        .find(|r| r.path.ends_with("/status"))
        .expect("status patch");
    let c = cond(&status.body["status"], "Ready");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("InvalidSpec"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("exactly one of instanceType")
    );
    let ev = reqs
        .iter()
        .find(|r| r.path.contains("/events"))
        .expect("a warning event");
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["reason"], "InvalidSpec");

    // The full reconcile returns Ok (no error-policy retries) for the same object.
    reconcile::reconcile(Arc::new(iec(bad)), ctx(client))
        .await
        .expect("invalid specs are not errors");
}

#[tokio::test]
async fn missing_keda_is_a_condition_not_an_error() {
    let (client, state) = fake(Cluster {
        replicas: 1,
        keda: false,
        ..Default::default()
    });
    let pass = reconcile::apply(&iec(endpoint(true, None)), &ctx(client))
        .await
        .unwrap();
    let c = cond(
        &serde_json::to_value(&pass.status).unwrap(),
        "AutoscalerReady",
    )
    .clone();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("KedaNotInstalled"))
    );
    assert!(
        state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r.path.ends_with("/status"))
    );
}

#[tokio::test]
async fn a_fixed_replica_endpoint_deletes_a_stale_scaled_object() {
    let (client, state) = fake(Cluster {
        replicas: 2,
        keda: true,
        ..Default::default()
    });
    let fixed = endpoint(
        true,
        Some(&|s: &mut Value| {
            s.as_object_mut().unwrap().remove("autoScalingSpec");
        }),
    );
    reconcile::apply(&iec(fixed), &ctx(client)).await.unwrap();
    let reqs = state.lock().unwrap().requests.clone();
    let dep = reqs
        .iter()
        .find(|r| r.method == "PATCH" && r.path.contains("/deployments/"))
        .unwrap();
    assert_eq!(dep.body["spec"]["replicas"], 2);
    assert!(reqs.iter().any(|r| r.method == "DELETE"
        && r.path == "/apis/keda.sh/v1alpha1/namespaces/ns/scaledobjects/m"));
}

#[tokio::test]
async fn a_catalog_model_without_its_catalog_reports_and_retries_later() {
    let (client, state) = fake(Cluster::default());
    let cm: CatalogModel = serde_json::from_value(json!({
        "apiVersion": "kvmesh.io/v1alpha1", "kind": "CatalogModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u", "finalizers": ["kvmesh.io/cleanup"]},
        "spec": {"modelId": "smollm2-135m"}
    }))
    .unwrap();
    let pass = reconcile::apply(&cm, &ctx(client.clone())).await.unwrap();
    assert_eq!(pass.requeue_after, Some(CATALOG_RETRY));
    let c = cond(&serde_json::to_value(&pass.status).unwrap(), "Ready").clone();
    assert_eq!(c["reason"], "CatalogUnresolved");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("kvmesh-model-catalog")
    );

    // Once the catalog exists, the same resource resolves and applies.
    let catalog: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/examples/catalog.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    {
        let mut st = state.lock().unwrap();
        st.configmap = Some(catalog);
        st.replicas = 1;
    }
    let pass = reconcile::apply(&cm, &ctx(client)).await.unwrap();
    assert_eq!(
        pass.status.resolved_model.as_deref(),
        Some("SmolLM2-135M-Instruct")
    );
    let st = state.lock().unwrap();
    let dep = st.last_deployment.as_ref().expect("deployment applied");
    assert_eq!(
        dep["metadata"]["ownerReferences"][0]["kind"],
        "CatalogModel"
    );
    assert_eq!(
        allowed_types(dep),
        ["m7i.xlarge", "m6i.xlarge"],
        "catalog instance types, Preferred"
    );
}

/// The Ordered fallback as a state machine: only the third type has capacity; pods stay
/// Unschedulable until the placement widens to it, one type per fallback delay.
#[tokio::test(start_paused = true)]
async fn ordered_fallback_widens_one_type_per_delay_until_pods_schedule() {
    let (client, state) = fake(Cluster {
        replicas: 2,
        keda: true,
        free_type: Some("ml.g5.8xlarge".into()),
        ..Default::default()
    });
    let cx = ctx(client);
    let mut obj = iec(endpoint(true, None));
    // First pass creates the Deployment; its pods appear and (through the pod watch) trigger
    // the next pass at once.
    let first = reconcile::apply(&obj, &cx).await.unwrap();
    assert_eq!(
        first
            .status
            .placement
            .as_ref()
            .unwrap()
            .allowed_instance_types,
        ["ml.p4d.24xlarge"]
    );
    obj.status = Some(first.status);
    let started = tokio::time::Instant::now();
    let mut widths = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..8 {
        let pass = reconcile::apply(&obj, &cx).await.unwrap();
        let placement = pass.status.placement.clone().unwrap();
        widths.push((
            started.elapsed().as_secs(),
            placement.allowed_instance_types.len(),
        ));
        obj.status = Some(pass.status.clone());
        let wait = pass.requeue_after.unwrap();
        waits.push(wait.as_secs());
        let scheduled = pass
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Scheduled" && c.status == "True");
        if scheduled {
            assert_eq!(wait, RESYNC, "settled: only the periodic resync remains");
            break;
        }
        tokio::time::sleep(wait).await;
    }
    // t=0: pinned to p4d, pods Unschedulable -> wait the full 5m delay.
    // t=300: widen to g5.24xlarge (still no capacity) -> wait another 5m.
    // t=600: widen to g5.8xlarge; the next look finds pods scheduled -> settle.
    assert_eq!(
        widths,
        [(0, 1), (300, 2), (600, 3), (900, 3)],
        "waits were {waits:?}"
    );
    let status = obj.status.as_ref().unwrap();
    let p = status.placement.as_ref().unwrap();
    assert_eq!(
        p.allowed_instance_types,
        ["ml.p4d.24xlarge", "ml.g5.24xlarge", "ml.g5.8xlarge"]
    );
    let added: Vec<&str> = p.steps.iter().map(|s| s.added.as_str()).collect();
    assert_eq!(added, ["ml.g5.24xlarge", "ml.g5.8xlarge"]);
    assert_eq!(p.steps[0].at, "2026-01-01T00:05:00Z");
    assert_eq!(p.steps[1].at, "2026-01-01T00:10:00Z");
    assert!(
        p.steps[0]
            .reason
            .contains("2 pod(s) Unschedulable for 300s")
    );
    assert!(p.unschedulable_since.is_none());
    let status_json = serde_json::to_value(status).unwrap();
    assert_eq!(cond(&status_json, "Scheduled")["status"], "True");
    assert_eq!(cond(&status_json, "Ready")["status"], "True");
    // The applied Deployment allows all three now, with descending preferences.
    let st = state.lock().unwrap();
    let dep = st.last_deployment.as_ref().unwrap();
    let prefs = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .unwrap();
    let w: Vec<i64> = prefs
        .iter()
        .map(|p| p["weight"].as_i64().unwrap())
        .collect();
    assert_eq!(w, [100, 95, 90]);
    let fallback_events = st
        .requests
        .iter()
        .filter(|r| r.path.contains("/events") && r.body["reason"] == "InstanceTypeFallback")
        .count();
    assert_eq!(fallback_events, 2, "one event per widening");
}

/// Pods that get scheduled before the delay runs out reset the clock: no widening.
#[tokio::test(start_paused = true)]
async fn ordered_fallback_does_not_widen_when_pods_schedule_in_time() {
    let (client, state) = fake(Cluster {
        replicas: 1,
        keda: true,
        free_type: Some("nowhere".into()),
        ..Default::default()
    });
    let cx = ctx(client);
    let mut obj = iec(endpoint(true, None));
    obj.status = Some(reconcile::apply(&obj, &cx).await.unwrap().status); // creates the Deployment
    let pass = reconcile::apply(&obj, &cx).await.unwrap();
    assert_eq!(pass.requeue_after, Some(Duration::from_secs(300)));
    assert!(
        pass.status
            .placement
            .as_ref()
            .unwrap()
            .unschedulable_since
            .is_some()
    );
    obj.status = Some(pass.status);
    tokio::time::sleep(Duration::from_secs(120)).await;
    state.lock().unwrap().free_type = None; // capacity appeared for p4d
    let pass = reconcile::apply(&obj, &cx).await.unwrap();
    obj.status = Some(pass.status.clone());
    let p = pass.status.placement.as_ref().unwrap();
    assert!(p.unschedulable_since.is_none(), "clock reset");
    assert_eq!(p.allowed_instance_types.len(), 1);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let pass = reconcile::apply(&obj, &cx).await.unwrap();
    assert_eq!(
        pass.status.placement.unwrap().allowed_instance_types.len(),
        1,
        "never widened"
    );
}

#[tokio::test]
async fn a_deployment_controlled_by_another_resource_is_not_taken_over() {
    let theirs = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "m", "namespace": "ns", "ownerReferences": [{"apiVersion": "kvmesh.io/v1alpha1",
            "kind": "CatalogModel", "name": "m", "uid": "other-uid", "controller": true}]}});
    let (client, state) = fake(Cluster {
        existing_deployment: Some(theirs),
        ..Default::default()
    });
    let pass = reconcile::apply(&iec(endpoint(true, None)), &ctx(client.clone()))
        .await
        .unwrap();
    assert_eq!(
        pass.requeue_after,
        Some(CATALOG_RETRY),
        "re-checked: the other resource may go away"
    );
    let c = cond(&serde_json::to_value(&pass.status).unwrap(), "Ready").clone();
    assert_eq!(c["reason"], "NameConflict");
    assert!(
        c["message"].as_str().unwrap().contains("CatalogModel m"),
        "{c}"
    );
    assert!(
        !state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r.method == "PATCH" && r.path.contains("/deployments/"))
    );

    // Our own Deployment (same uid) is simply applied.
    let ours = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "m", "namespace": "ns", "ownerReferences": [{"apiVersion": "kvmesh.io/v1alpha1",
            "kind": "InferenceEndpointConfig", "name": "m", "uid": "uid-1", "controller": true}]}});
    state.lock().unwrap().existing_deployment = Some(ours);
    reconcile::apply(&iec(endpoint(true, None)), &ctx(client))
        .await
        .unwrap();
    assert!(
        state
            .lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r.method == "PATCH" && r.path.contains("/deployments/"))
    );
}
